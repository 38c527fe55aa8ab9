// The reading worklist (issue 18; the workflow of ADR 0033 and 0034): a radiologist's triaged
// reading Tasks, claiming and releasing them, the report form (sections, conclusion, agreement
// with the AI, critical result), and the acknowledgement of the critical results they reported.
//
// Only FHIR interactions the facade already serves (tests/reading/ shows the same requests):
// - the worklist: Task?code=<read>&status=requested&_sort=-priority,authored-on, and the user's own
//   claims: Task?code=<read>&owner=<fhirUser>&status=accepted,in-progress (each with
//   _include=Task:focus for the ImagingStudy); the AI reports named by the Tasks' input:
//   DiagnosticReport?_id=..&_include=DiagnosticReport:result (the finding and its class scores);
// - claim: PUT Task with If-Match W/"<versionId>", status in-progress, owner the fhirUser; a stale
//   version is 412 and a Task another radiologist holds is 409 reading_task_claimed (ADR 0033 2);
//   release: PUT without owner, status requested;
// - the report: POST, then PUT with If-Match, a DiagnosticReport with the sections as contained
//   Observations (LOINC section codes), conclusion, conclusionCode, the stated agreement
//   extension (ADR 0034 1), `interpretation` AA on the impression for a critical result (ADR 0034
//   3); preliminary while drafting, final to sign (the server then completes the Task);
// - acknowledgements: Communication?category=alert&sender=<fhirUser>, and the escalation Tasks
//   Task?code=critical-result-follow-up&focus=Communication/..
//
// Everything is built with DOM methods and textContent (no innerHTML of server data).

import { h } from '../smart.js';

const TASK_CODES = 'http://fhir-facade.org/fhir/CodeSystem/task-code';
const READ = `${TASK_CODES}|read`;
const FOLLOW_UP = `${TASK_CODES}|critical-result-follow-up`;
const ALERT = 'http://terminology.hl7.org/CodeSystem/communication-category|alert';
const AGREEMENT_EXTENSION = 'http://fhir-facade.org/fhir/StructureDefinition/ai-agreement';
const INTERPRETATION = 'http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation';
const LOINC = 'http://loinc.org';
const RADIOLOGY = { system: 'http://terminology.hl7.org/CodeSystem/v2-0074', code: 'RAD', display: 'Radiology' };
const IMAGING_REPORT = { system: LOINC, code: '18748-4', display: 'Diagnostic imaging study' };
const CRITICAL_ABNORMAL = { system: INTERPRETATION, code: 'AA', display: 'Critical abnormal' };
const CRITICAL_FLAGS = ['AA', 'HH', 'LL']; // critical abnormal, high, low (ADR 0034 3)
const AI_INPUT = 'Preliminary AI report';
const AI_FINDING = '121071'; // DCM "Finding": the AI report's finding Observation

/** The sections of a radiology report (ADR 0033 3): element id, LOINC code, label. */
const SECTIONS = [
  ['technique', '55111-9', 'Technique'],
  ['comparison', '18834-2', 'Comparison'],
  ['findings', '59776-5', 'Findings'],
  ['impression', '19005-8', 'Impression'],
];

/** R4 request-priority: the label shown (always text, never colour alone) and its rank. */
const PRIORITIES = {
  stat: { label: 'STAT', rank: 3 },
  asap: { label: 'ASAP', rank: 2 },
  urgent: { label: 'Urgent', rank: 1 },
  routine: { label: 'Routine', rank: 0 },
};

const AGREEMENTS = [
  ['', 'Not stated (compare the conclusion codes)'],
  ['agree', 'Agree with the AI finding'],
  ['partial', 'Partly agree'],
  ['disagree', 'Disagree with the AI finding'],
];

/** An error answer of the FHIR API, with its OperationOutcome's codes. */
export class FhirError extends Error {
  constructor(status, outcome, text) {
    const issue = outcome?.resourceType === 'OperationOutcome' ? outcome.issue?.[0] ?? {} : {};
    const message = issue.diagnostics || issue.details?.text || text || `HTTP ${status}`;
    super(message);
    this.name = 'FhirError';
    this.status = status;
    this.code = issue.code ?? null;
    this.detail = issue.details?.coding?.[0]?.code ?? null;
  }
}

function authorization(ctx) {
  const header = ctx.client?.getAuthorizationHeader?.();
  return header || (ctx.token ? `Bearer ${ctx.token}` : null);
}

/**
 * One FHIR interaction against ctx.fhirBase with the user's token; JSON in, JSON out. Plain fetch
 * rather than client.request: a refused claim must be told apart by its status and its
 * OperationOutcome's code (412, 409 reading_task_claimed), and writes send If-Match. The header
 * comes from the fhirclient Client at each call, so a renewed token is used.
 */
async function fhir(ctx, method, path, { body, ifMatch } = {}) {
  const headers = { Accept: 'application/fhir+json' };
  const auth = authorization(ctx);
  if (auth) headers.Authorization = auth;
  if (body !== undefined) headers['Content-Type'] = 'application/fhir+json';
  if (ifMatch) headers['If-Match'] = ifMatch;
  const url = /^https?:/.test(path) ? path : `${ctx.fhirBase.replace(/\/$/, '')}/${path}`;
  const response = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) throw new FhirError(response.status, json, text);
  return json;
}

function search(ctx, type, params) {
  return fhir(ctx, 'GET', `${type}?${new URLSearchParams(params)}`);
}

function entries(bundle, mode = 'match') {
  return (bundle?.entry ?? [])
    .filter((e) => (e.search?.mode ?? 'match') === mode)
    .map((e) => e.resource);
}

function etag(resource) {
  return `W/"${resource.meta?.versionId}"`;
}

function referenceId(reference, type) {
  const value = reference?.reference ?? '';
  const prefix = `${type}/`;
  return value.startsWith(prefix) ? value.slice(prefix.length).split('/')[0] : null;
}

function button(label, onclick, attributes = {}) {
  return h('button', { type: 'button', ...attributes, onclick }, label);
}

function emptyRow(body, columns, text) {
  body.replaceChildren(h('tr', {}, h('td', { colspan: columns, className: 'wl-empty' }, text)));
}

function flaggedCritical(observation) {
  return (observation.interpretation ?? []).some((concept) =>
    concept.coding?.some((c) => c.system === INTERPRETATION && CRITICAL_FLAGS.includes(c.code)),
  );
}

const KEPT_PREFIX = 'worklist-form:';

function keptForm(taskId) {
  try {
    return JSON.parse(sessionStorage.getItem(`${KEPT_PREFIX}${taskId}`) ?? 'null');
  } catch {
    return null;
  }
}

/** A link to sign in again with the reading profile (the same tab: sessionStorage is kept). */
function signInAgain() {
  return h('a', { href: new URL('../launch.html?profile=reader', import.meta.url).href }, 'sign in again');
}

function forgetForm(taskId) {
  sessionStorage.removeItem(`${KEPT_PREFIX}${taskId}`);
}

/** The report form's values from the user's saved draft (or empty ones). */
function draftValues(draft) {
  const sections = new Map(
    (draft?.contained ?? []).filter((c) => c.resourceType === 'Observation').map((c) => [c.id, c]),
  );
  const coding = draft?.conclusionCode?.[0]?.coding?.[0];
  const values = {
    conclusion: draft?.conclusion ?? '',
    code: coding ? `${coding.system}|${coding.code}` : '',
    agreement: (draft?.extension ?? []).find((e) => e.url === AGREEMENT_EXTENSION)?.valueCode ?? '',
    critical: [...sections.values()].some(flaggedCritical),
  };
  for (const [id] of SECTIONS) values[id] = sections.get(id)?.valueString ?? '';
  return values;
}

function when(instant) {
  if (!instant) return '';
  const date = new Date(instant);
  return Number.isNaN(date.getTime()) ? instant : date.toLocaleString();
}

function conceptText(concept) {
  return concept?.text || concept?.coding?.find((c) => c.display)?.display || concept?.coding?.[0]?.code || '';
}

function sameCoding(a, b) {
  return a?.system === b?.system && a?.code === b?.code;
}

/** The AI's finding for a reading Task: its report, the finding's concept, score and class scores. */
function aiSummary(task, aiReports, observations) {
  const input = (task.input ?? []).find((i) => i.type?.text === AI_INPUT);
  const report = aiReports.get(referenceId(input?.valueReference, 'DiagnosticReport'));
  if (!report) return null;
  const findingRef = (report.result ?? [])
    .map((r) => observations.get(referenceId(r, 'Observation')))
    .find((o) => o?.code?.coding?.some((c) => c.code === AI_FINDING));
  const concept = report.conclusionCode?.[0] ?? findingRef?.valueCodeableConcept ?? null;
  const classes = (findingRef?.component ?? [])
    .filter((c) => c.code?.coding?.length && typeof c.valueQuantity?.value === 'number')
    .map((c) => ({ coding: c.code.coding[0], label: conceptText(c.code), score: c.valueQuantity.value }));
  const own = classes.find((c) => concept?.coding?.some((coding) => sameCoding(coding, c.coding)));
  return { report, concept, score: own?.score ?? null, classes };
}

function studyLabel(study, task) {
  const patient = study?.subject?.display || task.for?.reference || 'Unknown patient';
  const what = study?.description || (study?.modality ?? []).map((m) => m.code).join(', ') || 'Imaging study';
  const patientId = referenceId(task.for, 'Patient') ?? referenceId(study?.subject, 'Patient');
  return { patient, what, patientId };
}

/** The patient's name, linked to their imaging timeline (the patient page: priors to compare). */
function patientLink(patient, patientId, className) {
  if (!patientId) return h('span', { className }, patient);
  return h('a', { className, href: `#/patient/${encodeURIComponent(patientId)}` }, patient);
}

function ensureStylesheet() {
  if (document.querySelector('link[data-page-style="worklist"]')) return;
  document.head.append(
    h('link', {
      rel: 'stylesheet',
      href: new URL('./worklist.css', import.meta.url).href,
      'data-page-style': 'worklist',
    }),
  );
}

/**
 * Render the reading worklist into `root` (the shell's page contract, issue 18).
 * @param {HTMLElement} root
 * @param {{client: object, fhirBase: string, token: string, fhirUser: string|null,
 *          openViewer: (uid: string) => void}} ctx
 */
export async function render(root, ctx) {
  ensureStylesheet();
  const state = {
    studies: new Map(),
    patients: new Map(), // Patient/x -> name, from the studies' subject
    aiReports: new Map(),
    observations: new Map(),
    tasks: new Map(),
    report: null, // the open report form's {task, draft}
  };

  const alertBox = h('div', { id: 'wl-alert', className: 'wl-alert', role: 'alert', tabindex: '-1' });
  alertBox.hidden = true;
  const statusLine = h('p', { id: 'wl-status', className: 'wl-status', role: 'status', 'aria-live': 'polite' });
  const mineBody = h('tbody', { id: 'wl-mine-rows' });
  const waitingBody = h('tbody', { id: 'wl-waiting-rows' });
  const reportPanel = h('section', {
    id: 'wl-report',
    className: 'wl-report',
    'aria-labelledby': 'wl-report-heading',
    hidden: true,
  });
  const criticalBody = h('tbody', { id: 'wl-critical-rows' });

  function say(text) {
    statusLine.textContent = text;
  }
  function warn(text) {
    alertBox.textContent = text;
    alertBox.hidden = !text;
  }

  const header = ['Priority', 'Patient and study', 'AI finding (preliminary)', 'Notes', 'Received', 'Actions'];
  const table = (id, caption, body) =>
    h(
      'table',
      { id, className: 'wl-table' },
      h('caption', {}, caption),
      h('thead', {}, h('tr', {}, header.map((name) => h('th', { scope: 'col' }, name)))),
      body,
    );

  root.replaceChildren(
    h(
      'div',
      { className: 'wl-page' },
      h(
        'div',
        { className: 'wl-heading' },
        h('h1', {}, 'Reading worklist'),
        button('Refresh', () => refresh(), { id: 'wl-refresh', className: 'secondary' }),
      ),
      ctx.fhirUser
        ? null
        : h(
            'p',
            { className: 'wl-warning' },
            'Your sign-in names no practitioner (no fhirUser): claiming and signing need one.',
          ),
      alertBox,
      statusLine,
      h(
        'section',
        { 'aria-labelledby': 'wl-mine-heading' },
        h('h2', { id: 'wl-mine-heading' }, 'My reads in progress'),
        table('wl-mine', 'Studies you have claimed', mineBody),
      ),
      h(
        'section',
        { 'aria-labelledby': 'wl-waiting-heading' },
        h('h2', { id: 'wl-waiting-heading' }, 'Waiting to be read'),
        table(
          'wl-waiting',
          'Unclaimed reads, most urgent first (STAT, ASAP, Urgent, Routine), then oldest',
          waitingBody,
        ),
      ),
      reportPanel,
      h(
        'section',
        { 'aria-labelledby': 'wl-critical-heading' },
        h('h2', { id: 'wl-critical-heading' }, 'Critical results I reported'),
        h(
          'table',
          { id: 'wl-critical', className: 'wl-table' },
          h('caption', {}, 'Notifications to the ordering practitioner and their acknowledgement'),
          h(
            'thead',
            {},
            h(
              'tr',
              {},
              ['Sent', 'Patient', 'Result', 'Notified', 'Acknowledgement'].map((name) =>
                h('th', { scope: 'col' }, name),
              ),
            ),
          ),
          criticalBody,
        ),
      ),
    ),
  );

  // ---- loading ---------------------------------------------------------------------------------

  async function loadTasks() {
    const common = [
      ['code', READ],
      ['_sort', '-priority,authored-on'],
      ['_count', '50'],
      ['_include', 'Task:focus'],
    ];
    const [waiting, mine] = await Promise.all([
      search(ctx, 'Task', [...common, ['status', 'requested']]),
      ctx.fhirUser
        ? search(ctx, 'Task', [...common, ['status', 'accepted,in-progress'], ['owner', ctx.fhirUser]])
        : Promise.resolve(null),
    ]);
    for (const bundle of [waiting, mine]) {
      for (const study of entries(bundle, 'include')) {
        if (study.resourceType !== 'ImagingStudy') continue;
        state.studies.set(study.id, study);
        if (study.subject?.reference && study.subject.display) {
          state.patients.set(study.subject.reference, study.subject.display);
        }
      }
    }
    const lists = { waiting: entries(waiting), mine: entries(mine) };
    for (const task of [...lists.waiting, ...lists.mine]) state.tasks.set(task.id, task);
    await loadAiReports([...lists.waiting, ...lists.mine]);
    return lists;
  }

  async function loadAiReports(tasks) {
    const ids = new Set();
    for (const task of tasks) {
      for (const input of task.input ?? []) {
        const id = referenceId(input.valueReference, 'DiagnosticReport');
        if (input.type?.text === AI_INPUT && id && !state.aiReports.has(id)) ids.add(id);
      }
    }
    if (!ids.size) return;
    const bundle = await search(ctx, 'DiagnosticReport', [
      ['_id', [...ids].join(',')],
      ['_include', 'DiagnosticReport:result'],
      ['_count', '100'],
    ]);
    for (const resource of bundle?.entry?.map((e) => e.resource) ?? []) {
      if (resource.resourceType === 'DiagnosticReport') state.aiReports.set(resource.id, resource);
      if (resource.resourceType === 'Observation') state.observations.set(resource.id, resource);
    }
  }

  async function refresh(message) {
    say('Loading the worklist…');
    try {
      const lists = await loadTasks();
      fillRows(mineBody, lists.mine, true, 'No claimed reads.');
      fillRows(waitingBody, lists.waiting, false, 'Nothing is waiting to be read.');
      await refreshCritical();
      say(message ?? `${lists.waiting.length} waiting, ${lists.mine.length} claimed by you.`);
    } catch (error) {
      say('');
      if (error.status === 401) {
        warn('');
        alertBox.replaceChildren('Your sign-in has expired: ', signInAgain(), '.');
        alertBox.hidden = false;
      } else {
        warn(`The worklist could not be loaded: ${error.message}`);
      }
    }
  }

  // ---- the lists -------------------------------------------------------------------------------

  function fillRows(body, tasks, mine, empty) {
    if (!tasks.length) {
      emptyRow(body, header.length, empty);
      return;
    }
    body.replaceChildren(...tasks.map((task) => row(task, mine)));
  }

  function row(task, mine) {
    const studyId = referenceId(task.focus, 'ImagingStudy');
    const study = state.studies.get(studyId);
    const { patient, what, patientId } = studyLabel(study, task);
    const priority = PRIORITIES[task.priority] ?? PRIORITIES.routine;
    const describedBy = `wl-study-${task.id}`;
    const ai = aiSummary(task, state.aiReports, state.observations);
    const notes = (task.note ?? []).map((n) => String(n.text ?? '').replace(/^triage: /, ''));
    const actions = [
      h(
        'button',
        {
          type: 'button',
          className: 'wl-open secondary',
          'aria-describedby': describedBy,
          disabled: !studyId,
          onclick: () => ctx.openViewer(studyId),
        },
        'Open study',
      ),
    ];
    if (mine) {
      actions.push(
        button('Write report', () => openReport(task.id), { className: 'wl-write', 'aria-describedby': describedBy }),
        button('Release', () => release(task.id), {
          className: 'wl-release secondary',
          'aria-describedby': describedBy,
        }),
      );
    } else {
      actions.unshift(
        button('Claim', () => claim(task.id), { className: 'wl-claim', 'aria-describedby': describedBy }),
      );
    }
    return h(
      'tr',
      { 'data-task-id': task.id, 'data-study-uid': studyId ?? '' },
      h(
        'td',
        {},
        h('span', { className: `wl-priority wl-priority-${task.priority ?? 'routine'}` }, priority.label),
      ),
      h(
        'td',
        { id: describedBy },
        patientLink(patient, patientId, 'wl-patient'),
        h('br'),
        h('span', {}, [what, study?.started ? ` · ${when(study.started)}` : ''].join('')),
        h('br'),
        h('span', { className: 'wl-uid' }, `Study ${studyId ?? 'unknown'}`),
      ),
      h('td', { className: 'wl-ai' }, aiCell(ai)),
      h(
        'td',
        { className: 'wl-notes' },
        notes.map((text) =>
          h(
            'p',
            {},
            text.startsWith('review') ? h('span', { className: 'wl-review' }, 'Review') : null,
            text.startsWith('review') ? ' ' : null,
            text,
          ),
        ),
        mine ? h('p', { className: 'wl-state' }, `Claimed by you (${task.status})`) : null,
      ),
      h('td', {}, when(task.authoredOn)),
      h('td', { className: 'wl-actions' }, actions),
    );
  }

  function aiCell(ai) {
    if (!ai) return h('span', { className: 'wl-muted' }, 'No AI result yet');
    const score = ai.score === null ? '' : ` (score ${ai.score.toFixed(2)})`;
    return [
      h('span', { className: 'wl-finding' }, `${conceptText(ai.concept) || 'Finding'}${score}`),
      h('br'),
      h('span', { className: 'wl-badge' }, 'AI, not reviewed'),
    ];
  }

  // ---- claim and release -----------------------------------------------------------------------

  /** Keyboard focus to a row's button after the lists were redrawn (the clicked one is gone). */
  function focusIn(body, taskId, selector) {
    body.querySelector(`tr[data-task-id="${CSS.escape(taskId)}"] ${selector}`)?.focus();
  }

  async function claim(taskId) {
    warn('');
    const task = state.tasks.get(taskId);
    const claimed = { ...task, status: 'in-progress' };
    if (ctx.fhirUser) claimed.owner = { reference: ctx.fhirUser };
    try {
      const saved = await fhir(ctx, 'PUT', `Task/${taskId}`, { body: claimed, ifMatch: etag(task) });
      state.tasks.set(taskId, saved);
      await refresh('Claimed. The study is in your reads.');
      focusIn(mineBody, taskId, '.wl-write');
    } catch (error) {
      if (error.status === 412 || error.status === 409) {
        warn(
          error.status === 412
            ? 'Someone else claimed this study first (it changed since your list was loaded). ' +
                'The worklist has been refreshed.'
            : `This study is already claimed by another radiologist: ${error.message} ` +
                'The worklist has been refreshed.',
        );
        await refresh('The worklist has been refreshed.');
        alertBox.focus();
      } else {
        warn(`The study could not be claimed: ${error.message}`);
      }
    }
  }

  async function release(taskId) {
    warn('');
    const task = state.tasks.get(taskId);
    const { owner, ...rest } = task;
    try {
      await fhir(ctx, 'PUT', `Task/${taskId}`, { body: { ...rest, status: 'requested' }, ifMatch: etag(task) });
      if (state.report?.task.id === taskId) closeReport();
      forgetForm(taskId); // the read is given back: what was typed for it goes too
      await refresh('Released: the study is back in the worklist.');
      focusIn(waitingBody, taskId, '.wl-claim');
    } catch (error) {
      warn(`The study could not be released: ${error.message}`);
      await refresh();
    }
  }

  // ---- the report ------------------------------------------------------------------------------

  /** The user's own unsigned report of the Task's study, if they saved a draft before. */
  async function findDraft(task, study) {
    const patient = referenceId(task.for, 'Patient') ?? referenceId(study?.subject, 'Patient');
    if (!patient || !ctx.fhirUser) return null;
    const bundle = await search(ctx, 'DiagnosticReport', [
      ['patient', patient],
      ['status', 'registered,partial,preliminary'],
      ['_sort', '-_lastUpdated'],
      ['_count', '50'],
    ]);
    const focus = task.focus?.reference;
    return (
      entries(bundle).find(
        (r) =>
          (r.imagingStudy ?? []).some((s) => s.reference === focus) &&
          (r.resultsInterpreter ?? []).some((p) => p.reference === ctx.fhirUser),
      ) ?? null
    );
  }

  async function openReport(taskId) {
    warn('');
    const task = state.tasks.get(taskId);
    const study = state.studies.get(referenceId(task.focus, 'ImagingStudy'));
    let draft = null;
    try {
      draft = await findDraft(task, study);
    } catch (error) {
      warn(`Your earlier draft could not be looked up: ${error.message}`);
    }
    state.report = { task, draft };
    buildReportForm(task, study, draft);
    reportPanel.hidden = false;
    const heading = reportPanel.querySelector('h2');
    heading.focus();
    heading.scrollIntoView({ block: 'start' });
  }

  function closeReport() {
    state.report = null;
    reportPanel.hidden = true;
    reportPanel.replaceChildren();
  }

  function field(id, label, value, hint) {
    const hintId = hint ? `${id}-hint` : undefined;
    const area = h('textarea', { id, name: id, rows: 3, 'aria-describedby': hintId });
    area.value = value ?? '';
    return h(
      'div',
      { className: 'wl-field' },
      h('label', { for: id }, label),
      hint ? h('span', { id: hintId, className: 'wl-hint' }, hint) : null,
      area,
    );
  }

  function buildReportForm(task, study, draft) {
    const { patient, what, patientId } = studyLabel(study, task);
    const studyUid = referenceId(task.focus, 'ImagingStudy');
    const ai = aiSummary(task, state.aiReports, state.observations);
    const kept = keptForm(task.id);
    const values = kept ?? draftValues(draft);

    const codeSelect = h('select', {
      id: 'wl-conclusion-code',
      name: 'conclusion-code',
      'aria-describedby': 'wl-conclusion-code-hint',
    });
    codeSelect.append(h('option', { value: '' }, 'None'));
    for (const option of ai?.classes ?? []) {
      const value = `${option.coding.system}|${option.coding.code}`;
      codeSelect.append(
        h('option', { value, selected: value === values.code }, option.coding.display || option.label),
      );
    }
    const criticalBox = h('input', {
      type: 'checkbox',
      id: 'wl-critical',
      name: 'critical',
      checked: values.critical,
      'aria-describedby': 'wl-critical-hint',
    });
    const formStatus = h('p', {
      id: 'wl-report-status',
      className: 'wl-status',
      role: 'status',
      'aria-live': 'polite',
    });
    const formAlert = h('div', { id: 'wl-report-alert', className: 'wl-alert', role: 'alert', hidden: true });

    const form = h(
      'form',
      {
        id: 'wl-report-form',
        novalidate: true,
        onsubmit: (event) => event.preventDefault(),
        oninput: () => keepForm(task.id),
        onchange: () => keepForm(task.id),
      },
      h(
        'div',
        { className: 'wl-report-grid' },
        h(
          'div',
          { className: 'wl-report-main' },
          h(
            'fieldset',
            { className: 'wl-sections' },
            h('legend', {}, 'Report sections'),
            SECTIONS.map(([id, , label]) => field(`wl-${id}`, label, values[id])),
          ),
          field('wl-conclusion', 'Conclusion', values.conclusion, 'Sent with a critical result.'),
        ),
        h(
          'div',
          { className: 'wl-report-side' },
          aiPanel(ai),
          h(
            'div',
            { className: 'wl-field' },
            h('label', { for: 'wl-conclusion-code' }, 'Conclusion code'),
            h('span', { id: 'wl-conclusion-code-hint', className: 'wl-hint' }, 'The classes of the AI model.'),
            codeSelect,
          ),
          h(
            'fieldset',
            { className: 'wl-agreement' },
            h('legend', {}, 'Agreement with the AI finding'),
            AGREEMENTS.map(([value, label]) =>
              h(
                'div',
                { className: 'wl-choice' },
                h('input', {
                  type: 'radio',
                  name: 'agreement',
                  id: `wl-agreement-${value || 'none'}`,
                  value,
                  checked: value === values.agreement,
                }),
                h('label', { for: `wl-agreement-${value || 'none'}` }, label),
              ),
            ),
          ),
          h(
            'div',
            { className: 'wl-choice wl-critical' },
            criticalBox,
            h('label', { for: 'wl-critical' }, 'Critical result'),
            h(
              'p',
              { id: 'wl-critical-hint', className: 'wl-hint' },
              'On signing, the ordering practitioner is notified and must acknowledge it.',
            ),
          ),
        ),
      ),
      formAlert,
      h(
        'div',
        { className: 'wl-buttons' },
        button('Save draft', () => save('preliminary'), { id: 'wl-save', className: 'secondary' }),
        button('Sign report', () => save('final'), { id: 'wl-sign' }),
        button('Open study', () => ctx.openViewer(studyUid), { id: 'wl-open-study', className: 'secondary' }),
        button('Close', () => closeReport(), { id: 'wl-close', className: 'secondary' }),
      ),
      formStatus,
    );

    reportPanel.replaceChildren(
      ...[
        h('h2', { id: 'wl-report-heading', tabindex: '-1' }, `Report: ${patient}, ${what}`),
        h(
          'p',
          { className: 'wl-report-meta' },
          h(
            'span',
            { className: 'wl-uid' },
            `Study ${studyUid}`,
            draft ? ` · your draft, saved ${when(draft.meta?.lastUpdated)}` : '',
            kept ? ' · restored what you typed before signing in again' : '',
          ),
          patientId ? patientLink(`Prior imaging of ${patient}`, patientId, 'wl-priors') : null,
        ),
        form,
      ].filter(Boolean), // replaceChildren would write null as text
    );
  }

  function aiPanel(ai) {
    if (!ai) return h('p', { className: 'wl-muted' }, 'No AI result for this study.');
    return h(
      'aside',
      { className: 'wl-ai-panel', 'aria-labelledby': 'wl-ai-heading' },
      h('h3', { id: 'wl-ai-heading' }, 'AI result: preliminary, machine-generated, not reviewed'),
      h('p', {}, ai.report.conclusion ?? conceptText(ai.concept)),
      ai.classes.length
        ? h(
            'ul',
            { className: 'wl-scores' },
            ai.classes.map((c) => h('li', {}, `${c.coding.display || c.label}: ${c.score.toFixed(2)}`)),
          )
        : null,
    );
  }

  function formValue(id) {
    return reportPanel.querySelector(`#${id}`)?.value.trim() ?? '';
  }

  // What the user typed is kept in this tab's sessionStorage until it is saved: the app's token
  // is short-lived (the built-in server: 300 s, no refresh token), and signing in again reloads
  // the page. It comes back when the form of the same Task is opened again (ADR 0045).
  function keepForm(taskId) {
    const values = {
      conclusion: formValue('wl-conclusion'),
      code: reportPanel.querySelector('#wl-conclusion-code')?.value ?? '',
      agreement: reportPanel.querySelector('input[name="agreement"]:checked')?.value ?? '',
      critical: Boolean(reportPanel.querySelector('#wl-critical')?.checked),
    };
    for (const [id] of SECTIONS) values[id] = formValue(`wl-${id}`);
    try {
      sessionStorage.setItem(`${KEPT_PREFIX}${taskId}`, JSON.stringify(values));
    } catch {
      // storage full or refused: the form still works, only nothing survives a new sign-in
    }
  }

  function reportResource(task, status) {
    const critical = reportPanel.querySelector('#wl-critical').checked;
    const contained = [];
    for (const [id, code, label] of SECTIONS) {
      const text = formValue(`wl-${id}`);
      if (!text) continue;
      const section = {
        resourceType: 'Observation',
        id,
        status: status === 'final' ? 'final' : 'preliminary',
        code: { coding: [{ system: LOINC, code, display: label }], text: label },
        valueString: text,
      };
      if (critical && id === 'impression') {
        section.interpretation = [{ coding: [CRITICAL_ABNORMAL] }];
      }
      contained.push(section);
    }
    const report = {
      resourceType: 'DiagnosticReport',
      status,
      category: [{ coding: [RADIOLOGY] }],
      code: { coding: [IMAGING_REPORT], text: 'Radiology report' },
      imagingStudy: [{ reference: task.focus.reference }],
    };
    const study = state.studies.get(referenceId(task.focus, 'ImagingStudy'));
    const subject = task.for ?? (study?.subject?.reference ? { reference: study.subject.reference } : null);
    if (subject) report.subject = subject;
    if (task.basedOn?.length) report.basedOn = task.basedOn;
    if (ctx.fhirUser) report.resultsInterpreter = [{ reference: ctx.fhirUser }];
    if (contained.length) {
      report.contained = contained;
      report.result = contained.map((c) => ({ reference: `#${c.id}` }));
    }
    const conclusion = formValue('wl-conclusion');
    if (conclusion) report.conclusion = conclusion;
    const code = reportPanel.querySelector('#wl-conclusion-code').value;
    if (code) {
      const [system, value] = code.split('|');
      const option = reportPanel.querySelector('#wl-conclusion-code').selectedOptions[0];
      report.conclusionCode = [{ coding: [{ system, code: value, display: option.textContent }] }];
    }
    const agreement = reportPanel.querySelector('input[name="agreement"]:checked')?.value;
    if (agreement) report.extension = [{ url: AGREEMENT_EXTENSION, valueCode: agreement }];
    return { report, critical };
  }

  function problem(status, critical) {
    if (status !== 'final') return null;
    if (!formValue('wl-impression') && !formValue('wl-conclusion')) {
      return 'A signed report has an impression or a conclusion.';
    }
    if (critical && !formValue('wl-impression')) {
      return 'A critical result is marked on the impression: write the impression.';
    }
    return null;
  }

  async function save(status) {
    const open = state.report;
    if (!open) return;
    const formAlert = reportPanel.querySelector('#wl-report-alert');
    const formStatus = reportPanel.querySelector('#wl-report-status');
    formAlert.hidden = true;
    const { report, critical } = reportResource(open.task, status);
    const invalid = problem(status, critical);
    if (invalid) {
      formAlert.textContent = invalid;
      formAlert.hidden = false;
      return;
    }
    formStatus.textContent = status === 'final' ? 'Signing…' : 'Saving…';
    try {
      const saved = open.draft
        ? await fhir(ctx, 'PUT', `DiagnosticReport/${open.draft.id}`, {
            body: { ...report, id: open.draft.id },
            ifMatch: etag(open.draft),
          })
        : await fhir(ctx, 'POST', 'DiagnosticReport', { body: report });
      open.draft = saved;
      forgetForm(open.task.id);
      if (status !== 'final') {
        formStatus.textContent = `Draft saved (preliminary) at ${when(saved.meta?.lastUpdated)}.`;
        return;
      }
      await signed(open.task, saved, critical);
    } catch (error) {
      formStatus.textContent = '';
      const verb = status === 'final' ? 'signed' : 'saved';
      if (error.status === 401) {
        formAlert.replaceChildren(
          `Your sign-in has expired, so the report was not ${verb}. What you typed is kept in this `,
          'browser tab: ',
          signInAgain(),
          ', then open the report again.',
        );
      } else {
        formAlert.textContent = `The report could not be ${verb}: ${error.message}`;
      }
      formAlert.hidden = false;
    }
  }

  /** After signing: the server has completed the Task (ADR 0033); show it, then the lists. */
  async function signed(task, report, critical) {
    let taskStatus = 'unknown';
    try {
      taskStatus = (await fhir(ctx, 'GET', `Task/${task.id}`)).status;
    } catch (error) {
      taskStatus = `not readable (${error.message})`;
    }
    state.report = null;
    const summary = h(
      'div',
      { id: 'wl-signed', className: 'wl-signed' },
      h('p', {}, `Report signed (final): DiagnosticReport/${report.id}.`),
      h('p', { id: 'wl-signed-task' }, `Reading task: ${taskStatus}.`),
      critical
        ? h('p', {}, 'Critical result: the ordering practitioner is being notified (see Critical results below).')
        : null,
      button('Close', () => closeReport(), { id: 'wl-close', className: 'secondary' }),
    );
    reportPanel.querySelector('form')?.replaceWith(summary);
    const studyLine = reportPanel.querySelector('.wl-uid');
    if (studyLine) studyLine.textContent = `Study ${referenceId(task.focus, 'ImagingStudy')}`;
    summary.querySelector('p').setAttribute('tabindex', '-1');
    summary.querySelector('p').focus();
    await refresh(`Report signed; reading task ${taskStatus}.`);
  }

  // ---- critical results and their acknowledgement ---------------------------------------------

  async function refreshCritical() {
    if (!ctx.fhirUser) {
      emptyRow(criticalBody, 5, 'Needs a practitioner sign-in.');
      return;
    }
    const bundle = await search(ctx, 'Communication', [
      ['category', ALERT],
      ['sender', ctx.fhirUser],
      ['_sort', '-sent'],
      ['_count', '20'],
    ]);
    const communications = entries(bundle);
    if (!communications.length) {
      emptyRow(criticalBody, 5, 'No critical results reported.');
      return;
    }
    const followUps = await search(ctx, 'Task', [
      ['code', FOLLOW_UP],
      ['focus', communications.map((c) => `Communication/${c.id}`).join(',')],
      ['_count', '100'],
    ]);
    const escalated = new Set(entries(followUps).map((t) => referenceId(t.focus, 'Communication')));
    criticalBody.replaceChildren(...communications.map((c) => criticalRow(c, escalated.has(c.id))));
  }

  function patientName(subject) {
    return subject?.display || state.patients.get(subject?.reference) || subject?.reference || '';
  }

  function criticalRow(communication, escalated) {
    const conclusion = (communication.payload ?? []).find((p) => p.contentString)?.contentString ?? '';
    const recipients = (communication.recipient ?? []).map((r) => r.display || r.reference);
    let status;
    let kind;
    if (communication.status === 'completed') {
      status = `Acknowledged${communication.received ? ` ${when(communication.received)}` : ''}`;
      if (escalated) status += ', after escalation';
      kind = 'acknowledged';
    } else if (escalated) {
      status = 'Not acknowledged: escalated (follow-up task created)';
      kind = 'escalated';
    } else {
      status = 'Awaiting acknowledgement';
      kind = 'waiting';
    }
    return h(
      'tr',
      { 'data-communication-id': communication.id, 'data-ack': kind },
      h('td', {}, when(communication.sent)),
      h('td', {}, patientName(communication.subject)),
      h('td', {}, conclusion),
      h('td', {}, recipients.length ? recipients.join(', ') : 'Nobody: the order names no requester'),
      h('td', {}, h('span', { className: `wl-ack wl-ack-${kind}` }, status)),
    );
  }

  await refresh();
}
