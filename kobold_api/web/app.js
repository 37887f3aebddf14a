// kobold_api's chat page: characters, conversations and streamed chat turns through the
// server-side chat API. Every string from the server or a card is shown with textContent;
// nothing here ever assigns HTML.
"use strict";

const KEY_STORE = "kobold_api.key";
const SETTINGS_STORE = "kobold_api.settings";
const DEFAULTS = {user_name: "You", temperature: 0.7, top_p: 0.9, top_k: 40, min_p: 0.05, rep_pen: 1.1,
                  max_length: 200};

const state = {
  characters: [],
  conversation: null,   // the open conversation, as GET /api/v1/conversations/<id> returns it
  busy: false,
  controller: null,     // the AbortController of the running stream
  contextSize: 0,
};

const $ = (id) => document.getElementById(id);

// ---- small DOM helpers --------------------------------------------------------------------
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

// A tiny, safe markdown renderer: ``` fenced code blocks, `code`, **bold**, *italic*, _italic_.
// It builds elements and text nodes only.
function renderMarkdown(text, into) {
  into.replaceChildren();
  const parts = String(text).split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {  // inside a fence; an unclosed fence (still streaming) is code too
      const newline = part.indexOf("\n");
      const lang = newline >= 0 ? part.slice(0, newline).trim() : "";
      const body = newline >= 0 && /^[\w+-]*$/.test(lang) ? part.slice(newline + 1) : part;
      const code = el("code", {text: body.replace(/\n$/, "")});
      if (lang && /^[\w+-]+$/.test(lang)) code.dataset.lang = lang;
      into.append(el("pre", {}, code));
    } else if (part) {
      renderInline(part, into);
    }
  });
}

const INLINE = /(\*\*[^*\n]+?\*\*|`[^`\n]+`|\*[^*\n]+?\*|\b_[^_\n]+?_\b)/;

function renderInline(text, into) {
  for (const piece of text.split(INLINE)) {
    if (!piece) continue;
    if (piece.length > 4 && piece.startsWith("**") && piece.endsWith("**")) {
      into.append(el("strong", {text: piece.slice(2, -2)}));
    } else if (piece.length > 2 && piece.startsWith("`") && piece.endsWith("`")) {
      into.append(el("code", {text: piece.slice(1, -1)}));
    } else if (piece.length > 2 && ((piece.startsWith("*") && piece.endsWith("*")) ||
                                    (piece.startsWith("_") && piece.endsWith("_")))) {
      into.append(el("em", {text: piece.slice(1, -1)}));
    } else {
      into.append(document.createTextNode(piece));
    }
  }
}

// ---- settings and key -------------------------------------------------------------------
function loadSettings() {
  try {
    return {...DEFAULTS, ...JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}")};
  } catch (_) {
    return {...DEFAULTS};
  }
}

function saveSettings(settings) {
  localStorage.setItem(SETTINGS_STORE, JSON.stringify(settings));
}

function fillSettingsForm() {
  const settings = loadSettings();
  for (const input of $("settings-form").querySelectorAll("input[name]")) {
    input.value = settings[input.name] ?? "";
  }
}

function readSettingsForm() {
  const settings = loadSettings();
  for (const input of $("settings-form").querySelectorAll("input[name]")) {
    if (input.type === "number") {
      const value = parseFloat(input.value);
      settings[input.name] = Number.isFinite(value) ? value : DEFAULTS[input.name];
    } else {
      settings[input.name] = input.value.trim() || DEFAULTS[input.name];
    }
  }
  saveSettings(settings);
}

function samplerFields() {
  const s = loadSettings();
  return {temperature: s.temperature, top_p: s.top_p, top_k: Math.round(s.top_k), min_p: s.min_p,
          rep_pen: s.rep_pen, max_new_tokens: Math.max(1, Math.round(s.max_length))};
}

let askedForKey = false;

function authHeaders() {
  const key = localStorage.getItem(KEY_STORE);
  return key ? {Authorization: "Bearer " + key} : {};
}

// fetch with the stored key; a 401 asks for the key once and retries.
async function request(method, path, body, extra) {
  const options = {method, headers: {...authHeaders()}, ...(extra || {})};
  if (body instanceof Blob) {
    options.body = body;
    options.headers["Content-Type"] = body.type || "application/octet-stream";
  } else if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  let response = await fetch(path, options);
  if (response.status === 401 && !askedForKey) {
    askedForKey = true;
    const key = window.prompt("This server needs an API key:");
    if (key) {
      localStorage.setItem(KEY_STORE, key.trim());
      options.headers = {...options.headers, ...authHeaders()};
      response = await fetch(path, options);
    }
  }
  if (response.ok) askedForKey = false;
  return response;
}

async function api(method, path, body) {
  const response = await request(method, path, body);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(errorText(data, response.status));
  return data;
}

function errorText(data, status) {
  const detail = data && (data.detail || data.error);
  if (detail && typeof detail === "object") {
    if (detail.msg) return detail.msg;
    if (detail.message) return detail.message;
    return Object.entries(detail).map(([k, v]) => k + ": " + [].concat(v).join(" ")).join("; ");
  }
  return detail ? String(detail) : "HTTP " + status;
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---- characters -------------------------------------------------------------------------
function initials(name) {
  return String(name).split(/\s+/).filter(Boolean).slice(0, 2).map((w) => w[0]).join("").toUpperCase() || "?";
}

function hue(name) {
  let h = 0;
  for (const c of String(name)) h = (h * 31 + c.codePointAt(0)) % 360;
  return h;
}

// A PNG card's picture, fetched once per character (with the key, so not as a plain <img src>).
const pictures = new Map();

function pictureOf(name) {
  const character = state.characters.find((c) => c.avatar && (c.id === name || c.name === name));
  if (!character) return null;
  if (!pictures.has(character.id)) {
    pictures.set(character.id,
      request("GET", "/api/v1/characters/" + encodeURIComponent(character.id) + "/avatar")
        .then((response) => (response.ok ? response.blob() : null))
        .then((blob) => (blob ? URL.createObjectURL(blob) : null))
        .catch(() => null));
  }
  return pictures.get(character.id);
}

// Initials on a colour; the card's picture over them once it has loaded (PNG cards only).
function avatar(name) {
  const node = el("span", {class: "avatar", text: initials(name), "aria-hidden": "true"});
  node.style.backgroundColor = `hsl(${hue(name)} 45% 45%)`;
  const picture = pictureOf(name);
  if (picture) {
    picture.then((url) => {
      if (url) node.replaceChildren(el("img", {src: url, alt: "", class: "picture"}));
    });
  }
  return node;
}

async function loadCharacters() {
  const data = await api("GET", "/api/v1/characters");
  state.characters = data.results || [];
  const list = $("characters");
  list.replaceChildren();
  for (const character of state.characters) {
    const description = (character.description || "").replace(/\{\{char\}\}/gi, character.name)
      .replace(/\{\{user\}\}/gi, loadSettings().user_name).replace(/\s+/g, " ").slice(0, 110);
    list.append(el("li", {},
      el("button", {type: "button", class: "item character", dataset: {id: character.id},
                    title: "Start a conversation with " + character.name,
                    onclick: () => startConversation(character)},
        avatar(character.name),
        el("span", {class: "item-text"},
          el("span", {class: "name", text: character.name}),
          el("span", {class: "description", text: description})))));
  }
}

async function uploadCard(file) {
  const status = $("upload-status");
  status.textContent = "Uploading " + file.name + "\u2026";
  try {
    const data = await api("POST", "/api/v1/characters", file);
    status.textContent = "Added " + data.result.name + ".";
    pictures.clear();  // a card uploaded under a taken name replaces that character's picture
    await loadCharacters();
  } catch (error) {
    status.textContent = "Upload failed: " + error.message;
  }
}

// ---- conversations ----------------------------------------------------------------------
async function loadConversations() {
  const data = await api("GET", "/api/v1/conversations");
  const list = $("conversations");
  list.replaceChildren();
  const conversations = (data.results || []).sort((a, b) => b.updated_at - a.updated_at);
  if (!conversations.length) list.append(el("li", {class: "note", text: "None yet: pick a character."}));
  for (const c of conversations) {
    const current = state.conversation && state.conversation.id === c.id;
    list.append(el("li", {class: current ? "current" : ""},
      el("button", {type: "button", class: "item conversation", dataset: {id: c.id},
                    onclick: () => openConversation(c.id)},
        avatar(c.character),
        el("span", {class: "item-text"},
          el("span", {class: "name", text: c.title || c.character}),
          el("span", {class: "description", text: c.character + " \u00b7 " + c.message_count + " messages"}))),
      el("span", {class: "item-actions"},
        el("button", {type: "button", class: "icon rename", title: "Rename", "aria-label": "Rename",
                      text: "\u270e", onclick: () => renameConversation(c)}),
        el("button", {type: "button", class: "icon delete", title: "Delete", "aria-label": "Delete",
                      text: "\u2715", onclick: () => deleteConversation(c)}))));
  }
}

async function startConversation(character) {
  try {
    const data = await api("POST", "/api/v1/conversations",
                           {character: character.id, user_name: loadSettings().user_name});
    showConversation(data.result);
    await loadConversations();
    closeSidebar();
    $("input").focus();
  } catch (error) {
    setStatus("Could not start a conversation: " + error.message);
  }
}

async function openConversation(id) {
  try {
    const data = await api("GET", "/api/v1/conversations/" + encodeURIComponent(id));
    showConversation(data.result);
    await loadConversations();
    closeSidebar();
  } catch (error) {
    if (location.hash) history.replaceState(null, "", location.pathname);
    setStatus("Could not open the conversation: " + error.message);
  }
}

async function renameConversation(c) {
  const title = window.prompt("New title:", c.title || "");
  if (title == null || !title.trim()) return;
  try {
    const data = await api("PATCH", "/api/v1/conversations/" + encodeURIComponent(c.id), {title: title.trim()});
    if (state.conversation && state.conversation.id === c.id) showConversation(data.result);
    await loadConversations();
  } catch (error) {
    setStatus("Rename failed: " + error.message);
  }
}

async function deleteConversation(c) {
  if (!window.confirm("Delete the conversation \u201c" + (c.title || c.character) + "\u201d?")) return;
  try {
    await api("DELETE", "/api/v1/conversations/" + encodeURIComponent(c.id));
    if (state.conversation && state.conversation.id === c.id) {
      state.conversation = null;
      history.replaceState(null, "", location.pathname);
      renderMessages();
    }
    await loadConversations();
  } catch (error) {
    setStatus("Delete failed: " + error.message);
  }
}

function showConversation(conversation) {
  state.conversation = conversation;
  const hash = "#c=" + encodeURIComponent(conversation.id);
  if (location.hash !== hash) history.replaceState(null, "", hash);
  renderMessages();
}

// ---- messages ---------------------------------------------------------------------------
function lastCharacterIndex() {
  const messages = state.conversation ? state.conversation.messages : [];
  const last = messages[messages.length - 1];
  return last && last.role === "character" ? last.index : null;
}

function renderMessages() {
  const conversation = state.conversation;
  const box = $("messages");
  box.replaceChildren();
  $("chat-title").textContent = conversation ? (conversation.title || conversation.character) : "Pick a character";
  for (const id of ["input", "send", "continue", "impersonate"]) $(id).disabled = !conversation || state.busy;
  if (!conversation) {
    box.append(el("p", {class: "empty note", text: "Pick a character on the left to start, or continue a conversation."}));
    return;
  }
  const lastReply = lastCharacterIndex();
  const messages = conversation.messages;
  for (const message of messages) {
    box.append(messageNode(message, message.index === lastReply && messages.length > 1));
  }
  $("continue").disabled = state.busy || lastReply === null;
  box.scrollTop = box.scrollHeight;
}

function messageNode(message, isLastReply) {
  const body = el("div", {class: "text"});
  renderMarkdown(message.text, body);
  const actions = el("div", {class: "actions"});
  const node = el("article", {class: "message " + message.role, dataset: {index: message.index}},
    el("header", {}, avatar(message.speaker || message.role), el("span", {class: "speaker", text: message.speaker || message.role}), actions),
    body);
  if (state.busy) return node;
  const swipes = message.swipes || [];
  if (message.role === "character" && swipes.length > 1) {
    actions.append(
      el("button", {type: "button", class: "icon swipe-left", title: "Previous swipe", "aria-label": "Previous swipe",
                    text: "\u2039", onclick: () => pickSwipe(message, message.swipe_id - 1)}),
      el("span", {class: "swipe-count", text: (message.swipe_id + 1) + "/" + swipes.length}));
    if (!isLastReply) {
      actions.append(el("button", {type: "button", class: "icon swipe-right", title: "Next swipe",
                                   "aria-label": "Next swipe", text: "\u203a",
                                   onclick: () => pickSwipe(message, message.swipe_id + 1)}));
    }
  }
  if (isLastReply) {
    // As in SillyTavern: past the last swipe, swiping right generates a new one.
    const atEnd = message.swipe_id >= swipes.length - 1;
    actions.append(el("button", {type: "button", class: "icon swipe-right", title: atEnd ? "New swipe" : "Next swipe",
                                 "aria-label": "Next swipe", text: "\u203a",
                                 onclick: () => atEnd ? sendTurn({regenerate: true}) : pickSwipe(message, message.swipe_id + 1)}),
                   el("button", {type: "button", class: "icon regenerate", title: "Regenerate", "aria-label": "Regenerate",
                                 text: "\u21bb", onclick: () => sendTurn({regenerate: true})}));
  }
  actions.append(
    el("button", {type: "button", class: "icon edit", title: "Edit", "aria-label": "Edit", text: "\u270e",
                  onclick: () => editMessage(node, message)}),
    el("button", {type: "button", class: "icon delete", title: "Delete", "aria-label": "Delete", text: "\u2715",
                  onclick: () => deleteMessage(message)}));
  return node;
}

async function pickSwipe(message, swipeId) {
  const count = (message.swipes || []).length;
  if (swipeId < 0 || swipeId >= count) return;
  await changeMessage("PATCH", message.index, {swipe_id: swipeId});
}

async function changeMessage(method, index, body) {
  try {
    const path = "/api/v1/conversations/" + encodeURIComponent(state.conversation.id) + "/messages/" + index;
    const data = await api(method, path, body);
    showConversation(data.result);
  } catch (error) {
    setStatus("Failed: " + error.message);
  }
}

function editMessage(node, message) {
  const area = el("textarea", {class: "edit-box", rows: "4"});
  area.value = message.text;
  const save = el("button", {type: "button", class: "save", text: "Save",
                             onclick: () => changeMessage("PATCH", message.index, {text: area.value})});
  const cancel = el("button", {type: "button", text: "Cancel", onclick: () => renderMessages()});
  node.querySelector(".text").replaceChildren(area, el("div", {class: "row"}, save, cancel));
  area.focus();
}

async function deleteMessage(message) {
  if (!window.confirm("Delete this message?")) return;
  await changeMessage("DELETE", message.index);
}

// ---- a streamed turn --------------------------------------------------------------------
function setBusy(busy) {
  state.busy = busy;
  $("stop").hidden = !busy;
  $("send").hidden = busy;
  renderMessagesButtons();
}

function renderMessagesButtons() {
  for (const id of ["input", "send", "continue", "impersonate"]) {
    $(id).disabled = !state.conversation || state.busy;
  }
  if (!state.busy) $("continue").disabled = !state.conversation || lastCharacterIndex() === null;
}

// Parse an SSE body: calls onEvent with each data object.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) {
        try { onEvent(JSON.parse(data)); } catch (error) { if (!(error instanceof SyntaxError)) throw error; }
      }
    }
  }
}

async function sendTurn(kind) {
  if (!state.conversation || state.busy) return;
  const input = $("input");
  const body = {conversation_id: state.conversation.id, ...samplerFields(), ...kind};
  if (!kind.regenerate && !kind._continue) body.user_input = input.value;
  const impersonate = Boolean(kind.impersonate);
  if (!impersonate && !kind.regenerate && !kind._continue) input.value = "";

  // Show the turn at once: the user's line, then the reply growing in its own bubble.
  const box = $("messages");
  const conversation = state.conversation;
  let target;
  setBusy(true);
  renderMessages();
  if (impersonate) {
    target = null;
  } else if (kind.regenerate) {
    target = box.lastElementChild.querySelector(".text");
    target.replaceChildren();
  } else if (kind._continue) {
    target = box.lastElementChild.querySelector(".text");
  } else {
    if (body.user_input) {
      box.append(messageNode({index: -1, role: "user", speaker: conversation.user_name, text: body.user_input}, false));
    }
    const node = messageNode({index: -1, role: "character", speaker: conversation.character, text: ""}, false);
    node.classList.add("pending");
    box.append(node);
    target = node.querySelector(".text");
  }
  const base = kind._continue ? lastMessageText() : (impersonate ? input.value : "");
  let text = "";
  let result = null;
  let failure = null;
  const started = performance.now();
  state.controller = new AbortController();
  document.body.dataset.busy = "true";
  setStatus("Generating\u2026");
  try {
    const response = await request("POST", "/api/v1/chat/stream", body, {signal: state.controller.signal});
    if (!response.ok) {
      failure = errorText(await response.json().catch(() => ({})), response.status);
    } else {
      await readEvents(response, (event) => {
        if (event.error) failure = event.error;
        if (event.results) result = event.results[0];
        if (event.token) {
          text += event.token;
          if (impersonate) input.value = base + text;
          else renderMarkdown(base + text, target);
          box.scrollTop = box.scrollHeight;
        }
      });
    }
  } catch (error) {
    failure = error.name === "AbortError" ? "Stopped; nothing was stored." : error.message;
  } finally {
    state.controller = null;
  }
  setBusy(false);
  if (result && result.conversation) {
    if (impersonate) input.value = result.text;
    showConversation(result.conversation);
    await Promise.all([loadConversations().catch(() => {}), reportPerf(result, performance.now() - started)]);
  } else {
    // Whatever happened, show what the server stored.
    await openConversation(conversation.id);
    setStatus(failure || "The reply ended without a result.");
  }
  delete document.body.dataset.busy;
}

function lastMessageText() {
  const messages = state.conversation.messages;
  return messages.length ? messages[messages.length - 1].text : "";
}

async function stopTurn() {
  if (state.controller) state.controller.abort();
  // Closing the stream stops the generation; this makes it immediate even behind a proxy.
  request("POST", "/api/extra/abort", {}).catch(() => {});
}

// ---- status line ------------------------------------------------------------------------
let modelName = "";

async function loadStatus() {
  try {
    const [model, context] = await Promise.all([api("GET", "/api/v1/model"),
                                                api("GET", "/api/extra/true_max_context_length")]);
    modelName = String(model.result || "").replace(/^koboldcpp\//, "");
    state.contextSize = context.value || 0;
    setStatus("Model: " + modelName + " \u00b7 context " + state.contextSize + " tokens");
  } catch (error) {
    setStatus("Could not reach the server: " + error.message);
  }
}

async function reportPerf(result, elapsedMs) {
  let speed = 0;
  try {
    const perf = await api("GET", "/api/extra/perf");
    speed = perf.last_eval_speed || 0;
  } catch (_) { /* the status line is best effort */ }
  if (!speed && result.completion_tokens) speed = result.completion_tokens / (elapsedMs / 1000);
  const used = (result.prompt_tokens || 0) + (result.completion_tokens || 0);
  const parts = ["Model: " + modelName];
  if (state.contextSize) parts.push("context " + used + "/" + state.contextSize);
  parts.push(speed.toFixed(1) + " tokens/s");
  if (result.dropped_turns) parts.push(result.dropped_turns + " old turns left out");
  setStatus(parts.join(" \u00b7 "));
}

// ---- layout -----------------------------------------------------------------------------
function closeSidebar() {
  document.body.classList.remove("sidebar-open");
}

function init() {
  fillSettingsForm();
  $("settings-form").addEventListener("input", readSettingsForm);
  $("open-settings").addEventListener("click", () => { $("settings").hidden = !$("settings").hidden; });
  $("close-settings").addEventListener("click", () => { $("settings").hidden = true; });
  $("settings-reset").addEventListener("click", () => { saveSettings({...DEFAULTS}); fillSettingsForm(); });
  $("settings-forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    askedForKey = false;  // the next 401 asks again
  });
  $("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
  $("close-sidebar").addEventListener("click", closeSidebar);

  $("composer").addEventListener("submit", (event) => { event.preventDefault(); sendTurn({}); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendTurn({});
    }
  });
  $("stop").addEventListener("click", stopTurn);
  $("continue").addEventListener("click", () => sendTurn({_continue: true}));
  $("impersonate").addEventListener("click", () => sendTurn({impersonate: true}));

  const drop = $("dropzone");
  $("card-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) uploadCard(file);
    event.target.value = "";
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) uploadCard(file);
  });

  window.addEventListener("hashchange", () => {
    const match = /^#c=(.+)$/.exec(location.hash);
    if (match && !(state.conversation && state.conversation.id === decodeURIComponent(match[1]))) {
      openConversation(decodeURIComponent(match[1]));
    }
  });
  renderMessages();
  (async () => {
    await loadStatus();
    await Promise.all([loadCharacters(), loadConversations()]).catch((error) => setStatus(error.message));
    const match = /^#c=(.+)$/.exec(location.hash);
    if (match) await openConversation(decodeURIComponent(match[1]));
    document.body.dataset.ready = "true";
  })();
}

document.addEventListener("DOMContentLoaded", init);
