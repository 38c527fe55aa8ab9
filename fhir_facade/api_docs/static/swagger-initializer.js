// Starts Swagger UI on /docs. A file rather than an inline script: the page's Content-Security-Policy
// allows scripts from the facade itself only (fhir_facade/api_docs, ADR 0021).
"use strict";
(function () {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    domNode: root,
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    deepLinking: true,
    showExtensions: true,
    // The default posts the document to validator.swagger.io for a badge: nothing leaves the site.
    validatorUrl: null,
  });
})();
