// Starts Swagger UI on /api/docs (a file, since the page's Content-Security-Policy allows no inline script).
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  if (typeof window.SwaggerUIBundle !== "function") return;  // the plain route table stays
  document.getElementById("route-table").removeAttribute("open");
  window.SwaggerUIBundle({
    url: "/api/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    tryItOutEnabled: false,
    requestInterceptor: (request) => {
      const key = localStorage.getItem("kobold_api.key");
      if (key && !request.headers.Authorization) request.headers.Authorization = "Bearer " + key;
      return request;
    },
  });
});
