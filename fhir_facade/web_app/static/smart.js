// SMART on FHIR helpers shared by the shell and the pages (ADR 0043): scopes (SMART App Launch 2.x
// scopes-and-launch-context.html, v2 and v1 syntax) and the signed-in user's fhirUser.

const V1_LETTERS = { read: "rs", write: "cud", "*": "cruds" };
const SCOPE = /^(patient|user|system)\/([A-Za-z]+|\*)\.([cruds]+|read|write|\*)(\?.*)?$/;

/** The scope string of a token response as a list. */
export function parseScopes(text) {
  return String(text || "").split(/\s+/).filter(Boolean);
}

/**
 * Whether `scopes` grant `letter` (one of c r u d s) on `type` in `context` ('patient' | 'user'),
 * ignoring ?query narrowing (the server decides the rest; this only decides what to show).
 */
export function grants(scopes, context, type, letter) {
  return scopes.some((scope) => {
    const match = SCOPE.exec(scope);
    if (!match || match[1] !== context) return false;
    if (match[2] !== "*" && match[2] !== type) return false;
    return (V1_LETTERS[match[3]] || match[3]).includes(letter);
  });
}

/** A JWT's claims, or {} for an opaque token (no signature check: the server checks it). */
export function jwtClaims(token) {
  const parts = String(token || "").split(".");
  if (parts.length !== 3) return {};
  try {
    const base64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return {};
  }
}

/** 'Practitioner/x' from a relative or absolute fhirUser reference, else null. */
export function relativeReference(reference) {
  const match = /([A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})$/.exec(String(reference || ""));
  return match ? `${match[1]}/${match[2]}` : null;
}

/**
 * The signed-in user: the id_token's fhirUser (external servers that issue one), the access
 * token's fhirUser claim (the built-in server puts it there) or the token response's.
 */
export function fhirUserOf(client) {
  const response = client.state.tokenResponse || {};
  let fromIdToken = null;
  try {
    fromIdToken = client.getFhirUser();
  } catch {
    fromIdToken = null;
  }
  return relativeReference(fromIdToken || jwtClaims(response.access_token).fhirUser || response.fhirUser);
}

/** A person's name from a FHIR HumanName list. */
export function humanName(names) {
  const name = (names || []).find((n) => n.use === "official") || (names || [])[0];
  if (!name) return null;
  if (name.text) return name.text;
  return [...(name.given || []), ...(name.family ? [name.family] : [])].join(" ") || null;
}

/** Create an element with attributes and children (strings become text: nothing is parsed as HTML). */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "className") element.className = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

/** Add a page's own stylesheet (pages/<name>.css) once; resolves when it is loaded. */
export function loadStylesheet(url) {
  const href = new URL(url, import.meta.url).href;
  const existing = [...document.querySelectorAll('link[rel="stylesheet"]')].find((l) => l.href === href);
  if (existing) return Promise.resolve();
  return new Promise((resolve) => {
    const link = h("link", { rel: "stylesheet", href });
    link.addEventListener("load", resolve);
    link.addEventListener("error", resolve); // unstyled beats blank
    document.head.append(link);
  });
}

/** A FHIR dateTime for people: date and time in the browser's locale, or the text as is. */
export function formatDateTime(value) {
  if (!value) return null;
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return value;
  const onlyDate = /^\d{4}(-\d{2}(-\d{2})?)?$/.test(value);
  return new Intl.DateTimeFormat(undefined, onlyDate ? { dateStyle: "medium" } : { dateStyle: "medium", timeStyle: "short" }).format(date);
}

/** The id at the end of a reference ('ImagingStudy/1.2.3' or an absolute URL), else null. */
export function referenceId(reference, type) {
  const match = new RegExp(`(?:^|/)${type}/([A-Za-z0-9\\-.]{1,64})(?:/_history/[^/]+)?$`).exec(String(reference || ""));
  return match ? match[1] : null;
}
