// The app shell (ADR 0043): completes the SMART sign-in (FHIR.oauth2.ready), builds the page
// context, shows the user and patient banner and the pages the granted scopes allow, and routes
// #/patient, #/worklist, #/upload (and #/study/<StudyInstanceUID> to the viewer) to ES modules
// pages/<name>.js that export `render(root, ctx)`.
import { fhirUserOf, grants, h, humanName, parseScopes } from "./smart.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const banner = document.getElementById("banner");
const signOut = document.getElementById("sign-out");

/** The pages, in menu order; `allowed(ctx)` decides whether the menu shows them. */
export const PAGES = {
  patient: {
    title: "Patient imaging",
    module: "./pages/patient.js",
    allowed: (ctx) =>
      Boolean(ctx.patientId) || grants(ctx.scopes, "user", "ImagingStudy", "s"),
    inMenu: (ctx) => Boolean(ctx.patientId),
  },
  worklist: {
    title: "Reading worklist",
    module: "./pages/worklist.js",
    // Reading means claiming Tasks: search and update.
    allowed: (ctx) => grants(ctx.scopes, "user", "Task", "s") && grants(ctx.scopes, "user", "Task", "u"),
  },
  upload: {
    title: "Upload",
    module: "./pages/upload.js",
    allowed: (ctx) => grants(ctx.scopes, "user", "ImagingStudy", "c"),
  },
};

function showMessage(title, message, ...extra) {
  main.replaceChildren(h("h1", {}, title), h("p", { role: "alert" }, message), ...extra);
}

function signInLinks() {
  return h(
    "p",
    {},
    h("a", { href: "launch.html", className: "button" }, "Sign in again"),
  );
}

/**
 * Sign out: revoke the refresh token at the server's revocation endpoint (RFC 7009; the built-in
 * server then ends the whole refresh token family, ADR 0047), forget the session (fhirclient keeps
 * it in sessionStorage) and go back to the launch page.
 */
async function endSession(client) {
  const refreshToken = (client.state.tokenResponse || {}).refresh_token;
  if (refreshToken) {
    try {
      const base = client.state.serverUrl.replace(/\/$/, "");
      const config = await (await fetch(`${base}/.well-known/smart-configuration`)).json();
      if (config.revocation_endpoint) {
        const body = new URLSearchParams({
          token: refreshToken,
          token_type_hint: "refresh_token",
          client_id: client.state.clientId,
        });
        await fetch(config.revocation_endpoint, { method: "POST", body });
      }
    } catch {
      // Signing out locally still happens; the family ends at its absolute lifetime.
    }
  }
  sessionStorage.clear();
  location.assign(new URL("launch.html", location.href).href);
}

/** Renew the access token this many seconds before it expires (a quarter of its life if shorter). */
const RENEW_AHEAD = 30;

/**
 * Keep the access token fresh while the app is open (SMART App Launch 2.x app-launch.html step 7):
 * renew it with the refresh token shortly before it expires, so that pages calling the FHIR or
 * DICOMweb API with plain fetch (ctx.token, client.getAuthorizationHeader()) and the viewer (which
 * reads fhirclient's sessionStorage when it opens) always find a live one. client.request renews
 * on its own as well. Browsers slow timers down in hidden tabs, so a tab that becomes visible
 * again checks at once. Without a refresh token (no online_access granted) nothing is scheduled.
 */
function keepTokenFresh(client) {
  let timer = null;
  const due = () => {
    const lifetime = Number((client.state.tokenResponse || {}).expires_in) || 300;
    return (client.state.expiresAt || 0) - Math.min(RENEW_AHEAD, lifetime / 4);
  };
  let retries = 0;
  const renew = async () => {
    const refreshToken = (client.state.tokenResponse || {}).refresh_token;
    if (!refreshToken) return;
    if (due() <= Date.now() / 1000) {
      try {
        await client.refresh();
        retries = 0;
      } catch (error) {
        // fhirclient drops the refresh token on any failure. A busy server (429) or a lost
        // connection did not use it up: keep it and try again a few times, a little later each.
        const transient = !error || !error.status || error.status === 429 || error.status >= 500;
        if (!transient || retries >= 3) return; // refused: the next API call reports the ended session
        retries += 1;
        client.state.tokenResponse.refresh_token = refreshToken;
        clearTimeout(timer);
        timer = setTimeout(renew, 2000 * retries);
        return;
      }
    }
    schedule();
  };
  const schedule = () => {
    clearTimeout(timer);
    if (!(client.state.tokenResponse || {}).refresh_token) return;
    timer = setTimeout(renew, Math.max(1, due() - Date.now() / 1000) * 1000);
  };
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") renew();
  });
  schedule();
}

function buildContext(client) {
  const tokenResponse = client.state.tokenResponse || {};
  const fhirBase = client.state.serverUrl.replace(/\/$/, "");
  const root = new URL("..", location.href);
  const ctx = {
    client,
    fhirBase,
    dicomwebBase: new URL("dicom-web", root).pathname,
    // The current access token: fhirclient replaces it when it renews it (keepTokenFresh).
    get token() {
      return (client.state.tokenResponse || {}).access_token;
    },
    patientId: client.patient.id || null,
    fhirUser: fhirUserOf(client),
    scopes: parseScopes(tokenResponse.scope),
    params: [],
    navigate(hash) {
      location.hash = hash.startsWith("#") ? hash : `#${hash}`;
    },
    openViewer(studyInstanceUid) {
      const viewer = new URL("viewer/viewer", root);
      viewer.searchParams.set("StudyInstanceUIDs", studyInstanceUid);
      location.assign(viewer.href);
    },
  };
  return ctx;
}

async function renderBanner(ctx) {
  const items = [];
  // An external server's id_token may carry the person's name (OpenID Connect Core 5.1).
  let idToken = null;
  try {
    idToken = ctx.client.getIdToken();
  } catch {
    idToken = null;
  }
  const name = idToken && typeof idToken.name === "string" ? idToken.name : null;
  const who = ctx.fhirUser || "a user without a FHIR identity";
  items.push(
    h("span", { className: "who" }, "Signed in as ", h("strong", {}, name || who), name && ctx.fhirUser ? ` (${ctx.fhirUser})` : ""),
  );
  banner.replaceChildren(...items);
  if (ctx.patientId) {
    const patient = h("span", { className: "patient", id: "patient-banner" }, "Patient ", h("strong", {}, ctx.patientId));
    banner.append(patient);
    try {
      const resource = await ctx.client.request(`Patient/${encodeURIComponent(ctx.patientId)}`);
      const name = humanName(resource.name);
      const details = [resource.gender, resource.birthDate ? `born ${resource.birthDate}` : null].filter(Boolean);
      patient.replaceChildren(
        "Patient ",
        h("strong", {}, name || ctx.patientId),
        ` · ${ctx.patientId}`,
        details.length ? ` · ${details.join(", ")}` : "",
      );
    } catch {
      // The id alone is still right; the page shows its own errors.
    }
  }
}

function renderNav(ctx) {
  const list = nav.querySelector("ul");
  list.replaceChildren();
  for (const [name, page] of Object.entries(PAGES)) {
    const shown = page.inMenu ? page.inMenu(ctx) : page.allowed(ctx);
    if (!shown) continue;
    list.append(h("li", {}, h("a", { href: `#/${name}`, "data-page": name }, page.title)));
  }
  nav.hidden = list.children.length === 0;
}

function defaultRoute(ctx) {
  for (const [name, page] of Object.entries(PAGES)) {
    if (page.inMenu ? page.inMenu(ctx) : page.allowed(ctx)) return `#/${name}`;
  }
  return null;
}

function markCurrent(name) {
  for (const link of nav.querySelectorAll("a[data-page]")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

let renderCount = 0;

async function route(ctx) {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const [name, ...params] = parts;
  if (name === "study" && params[0]) {
    ctx.openViewer(params[0]);
    return;
  }
  const page = PAGES[name];
  markCurrent(name);
  if (!page) {
    const fallback = defaultRoute(ctx);
    if (fallback && name === undefined) {
      location.replace(fallback);
      return;
    }
    showMessage("Page not found", `There is no page ${JSON.stringify(location.hash)}.`);
    return;
  }
  if (!page.allowed(ctx)) {
    showMessage(page.title, "Your sign-in does not allow this page. Sign in with the right profile.", signInLinks());
    return;
  }
  const current = ++renderCount;
  document.title = `${page.title} · Imaging app`;
  let module;
  try {
    module = await import(page.module);
  } catch {
    showMessage(page.title, "This page is not available on this server yet.");
    return;
  }
  if (current !== renderCount) return; // the user moved on meanwhile
  const root = h("div", { className: `page page-${name}` });
  main.replaceChildren(root);
  try {
    // Copied with its accessors, so that the page's ctx.token stays the current token.
    const pageCtx = Object.defineProperties({}, Object.getOwnPropertyDescriptors(ctx));
    pageCtx.params = params;
    await module.render(root, pageCtx);
  } catch (error) {
    if (current !== renderCount) return;
    const expired = error && error.status === 401;
    showMessage(
      page.title,
      expired ? "Your session has expired." : `The page could not be shown: ${error.message || error}`,
      ...(expired ? [signInLinks()] : []),
    );
  }
  if (current === renderCount) main.focus({ preventScroll: true });
}

async function start() {
  if (!window.FHIR) {
    showMessage(
      "Imaging app",
      "The app's browser library is not installed on this server: run `bash scripts/setup.sh run`.",
    );
    return;
  }
  // A refresh sends client_id: public clients authenticate by it alone (RFC 6749 2.3.1, 6).
  FHIR.oauth2.settings.refreshTokenWithClientId = true;
  let client;
  try {
    client = await FHIR.oauth2.ready();
  } catch (error) {
    showMessage("Not signed in", `Sign in to use the app. (${error.message || error})`, signInLinks());
    return;
  }
  if (!(client.state.tokenResponse || {}).access_token) {
    // fhirclient treats a server without SMART discovery as an open one and signs nobody in.
    showMessage(
      "No sign-in on this server",
      "This FHIR server offers no SMART sign-in: start the facade with FACADE_AUTH=smart.",
    );
    return;
  }
  const ctx = buildContext(client);
  window.imagingApp = { ctx }; // for tests and the browser console
  keepTokenFresh(client);
  signOut.hidden = false;
  signOut.addEventListener("click", () => endSession(client));
  renderNav(ctx);
  renderBanner(ctx);
  window.addEventListener("hashchange", () => route(ctx));
  if (!location.hash || location.hash === "#" || location.hash === "#/") {
    const fallback = defaultRoute(ctx);
    if (!fallback) {
      showMessage("Imaging app", "Your sign-in grants none of the app's pages.", signInLinks());
      return;
    }
    location.replace(fallback);
    return;
  }
  await route(ctx);
}

start();
