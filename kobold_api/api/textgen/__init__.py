"""text-generation-webui's legacy API: its extra routes on the main port, websocket streaming on ``ws_port``."""
