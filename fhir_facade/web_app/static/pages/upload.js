// Upload page (issue 18): an administrator drops DICOM files and zips, sees their key tags (read in
// the browser with dicom-parser and JSZip from /app/vendor), matches them to the EHR's Patient and
// order, and imports them with `ImagingStudy/$import` (ADR 0038), which coerces the identity to that
// Patient and order and keeps the previous values in the Original Attributes Sequence (ADR 0039,
// PS3.3 C.12.1.1.9). What is editable before import is what the server supports: the Patient (by
// reference or by an MRN) and the order; the other tags travel as they are.

import { grants } from '../smart.js';

const VENDOR = {
  dicomParser: new URL('../vendor/dicomParser.min.js', import.meta.url).href,
  JSZip: new URL('../vendor/jszip.min.js', import.meta.url).href,
};
const STYLE = new URL('./upload.css', import.meta.url).href;

/** Key tags shown for every entry (PS3.6 tags, dicom-parser's `xggggeeee` form). */
const TAGS = [
  ['PatientID', 'x00100020', 'Patient ID'],
  ['PatientName', 'x00100010', 'Name'],
  ['PatientBirthDate', 'x00100030', 'Birth date'],
  ['PatientSex', 'x00100040', 'Sex'],
  ['StudyInstanceUID', 'x0020000d', 'Study UID'],
  ['StudyDescription', 'x00081030', 'Study description'],
  ['Modality', 'x00080060', 'Modality'],
  ['AccessionNumber', 'x00080050', 'Accession'],
];
const PIXEL_DATA = 'x7fe00010';
const DICOMDIR_CLASS = '1.2.840.10008.1.3.10';
/** Headers are read from the start of a file; a header longer than this reads the whole file. */
const HEADER_BYTES = 4 * 1024 * 1024;
/** Zips up to this size are listed in the browser (JSZip holds the archive in memory). */
const ZIP_PREVIEW_BYTES = 512 * 1024 * 1024;
const ZIP_PREVIEW_ENTRIES = 2000;
/** Uploads from this size (and every zip) run as a job whose X-Progress the page shows. */
const ASYNC_FROM_BYTES = 8 * 1024 * 1024;
const V2_0203 = 'http://terminology.hl7.org/CodeSystem/v2-0203';
const STATUS_TEXT = {
  stored: 'stored',
  'stored-with-warnings': 'stored with warnings',
  'already-stored': 'already stored',
  refused: 'refused',
  skipped: 'skipped',
};

// -- small DOM helpers ----------------------------------------------------------------------------

function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === 'class') element.className = value;
    else if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

let uniqueCounter = 0;
const uniqueId = (prefix) => `${prefix}-${++uniqueCounter}`;

function loadScript(url, globalName) {
  if (window[globalName]) return Promise.resolve(window[globalName]);
  return new Promise((resolve, reject) => {
    const script = h('script', { src: url });
    script.addEventListener('load', () => resolve(window[globalName]));
    script.addEventListener('error', () => reject(new Error(`${url} could not be loaded`)));
    document.head.append(script);
  });
}

function addStyle() {
  if (document.querySelector(`link[href="${STYLE}"]`)) return;
  document.head.append(h('link', { rel: 'stylesheet', href: STYLE }));
}

function formatBytes(size) {
  if (size < 1024) return `${size} B`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} KiB`;
  return `${(size / 1024 / 1024).toFixed(1)} MiB`;
}

// -- reading files in the browser -----------------------------------------------------------------

function errorText(error) {
  if (typeof error === 'string') return error;
  return (error && (error.message || error.exception)) || String(error);
}

/** The key tags of one DICOM Part 10 file's bytes, or {error} when it cannot be read. */
function readTags(dicomParser, bytes) {
  const prefixed = bytes.length > 132 && String.fromCharCode(...bytes.subarray(128, 132)) === 'DICM';
  if (!prefixed) return { error: 'not a DICOM Part 10 file (no DICM prefix)', notDicom: true };
  let dataSet;
  try {
    dataSet = dicomParser.parseDicom(bytes, { untilTag: PIXEL_DATA });
  } catch (error) {
    return { error: `DICOM that cannot be read: ${errorText(error)}`, truncated: true };
  }
  const tags = {};
  for (const [keyword, tag] of TAGS) tags[keyword] = (dataSet.string(tag) || '').trim();
  tags.IssuerOfPatientID = (dataSet.string('x00100021') || '').trim();
  tags.SOPInstanceUID = (dataSet.string('x00080018') || '').trim();
  if ((dataSet.string('x00020002') || '').trim() === DICOMDIR_CLASS) {
    return { tags, note: 'a DICOMDIR: the server skips it' };
  }
  return { tags };
}

async function readFileEntry(dicomParser, file) {
  const head = new Uint8Array(await file.slice(0, HEADER_BYTES).arrayBuffer());
  let read = readTags(dicomParser, head);
  if (read.truncated && file.size > HEADER_BYTES) {
    read = readTags(dicomParser, new Uint8Array(await file.arrayBuffer()));
  }
  return { name: file.name, ...read };
}

async function isZip(file) {
  const head = new Uint8Array(await file.slice(0, 4).arrayBuffer());
  return head[0] === 0x50 && head[1] === 0x4b && head[2] === 0x03 && head[3] === 0x04;
}

/** One dropped file: its kind and the tags of each entry (a zip's members, or the file itself). */
async function inspect(file) {
  const dicomParser = await loadScript(VENDOR.dicomParser, 'dicomParser');
  if (!(await isZip(file))) {
    return { file, kind: 'dicom', entries: [await readFileEntry(dicomParser, file)] };
  }
  if (file.size > ZIP_PREVIEW_BYTES) {
    return { file, kind: 'zip', entries: [], note: `too large to list in the browser (${formatBytes(file.size)}); uploaded as it is` };
  }
  const JSZip = await loadScript(VENDOR.JSZip, 'JSZip');
  let archive;
  try {
    archive = await JSZip.loadAsync(file);
  } catch (error) {
    return { file, kind: 'zip', entries: [], note: `the zip cannot be read: ${errorText(error)}` };
  }
  const members = Object.values(archive.files).filter((member) => !member.dir);
  const entries = [];
  for (const member of members.slice(0, ZIP_PREVIEW_ENTRIES)) {
    const bytes = await member.async('uint8array');
    const base = member.name.split('/').pop();
    const read = base.toUpperCase() === 'DICOMDIR'
      ? { note: 'a DICOMDIR: the server skips it', notDicom: true }
      : readTags(dicomParser, bytes);
    entries.push({ name: member.name, ...read });
  }
  const hidden = members.length - entries.length;
  return {
    file,
    kind: 'zip',
    entries,
    note: hidden > 0 ? `${hidden} more entries not listed` : null,
  };
}

// -- the identity the server will coerce to (ADR 0038, intake/identity.py) ------------------------

function pnComponent(text) {
  return String(text || '').replace(/[\^=\\]/g, ' ').trim();
}

/** HumanName -> PN Family^Given^Middle^Prefix^Suffix (PS3.5 6.2.1), the official name first. */
function pnFromNames(names) {
  const usable = names.filter((n) => !['old', 'anonymous'].includes(n.use));
  const ordered = (usable.length ? usable : names).slice().sort((a, b) => (a.use !== 'official') - (b.use !== 'official'));
  for (const name of ordered) {
    const given = (name.given || []).map(pnComponent);
    const parts = [
      pnComponent(name.family),
      given[0] || '',
      given.slice(1).filter(Boolean).join(' '),
      (name.prefix || []).map(pnComponent).join(' '),
      (name.suffix || []).map(pnComponent).join(' '),
    ];
    if (parts.some(Boolean)) return parts.join('^').replace(/\^+$/, '');
    if (pnComponent(name.text)) return pnComponent(name.text);
  }
  return '';
}

function mrnOf(patient) {
  const identifiers = (patient.identifier || []).filter((i) => i.value && i.system);
  const typed = identifiers.find((i) => ((i.type || {}).coding || []).some((c) => c.system === V2_0203 && c.code === 'MR'));
  return typed || identifiers[0] || null;
}

function accessionOf(order) {
  const identifiers = (order.identifier || []).filter((i) => i.value);
  const acsn = identifiers.find((i) => ((i.type || {}).coding || []).some((c) => c.system === V2_0203 && c.code === 'ACSN'));
  if (acsn) return acsn.value;
  const plain = identifiers.filter((i) => i.system !== 'urn:dicom:uid');
  return plain.length ? plain[0].value : '';
}

/** Keyword -> the value the server sets; a keyword left out is not touched. */
function targetIdentity(match) {
  const target = {};
  if (match.patient) {
    const mrn = mrnOf(match.patient);
    if (mrn) target.PatientID = mrn.value;
    const name = pnFromNames(match.patient.name || []);
    if (name) target.PatientName = name;
    if (/^\d{4}-\d{2}-\d{2}$/.test(match.patient.birthDate || '')) target.PatientBirthDate = match.patient.birthDate.replaceAll('-', '');
    if (match.patient.gender) target.PatientSex = { male: 'M', female: 'F', other: 'O' }[match.patient.gender] || '';
  } else if (match.mrn) {
    target.PatientID = match.mrn.value;
  }
  if (match.order) {
    const accession = accessionOf(match.order);
    if (accession) target.AccessionNumber = accession;
  }
  return target;
}

function displayName(patient) {
  const pn = pnFromNames(patient.name || []);
  return pn ? pn.split('^').filter(Boolean).join(' ') : '(no name)';
}

// -- the page -------------------------------------------------------------------------------------

export async function render(root, ctx) {
  addStyle();
  root.replaceChildren();
  root.classList.add('upload-page'); // upload.css applies inside it only
  const heading = h('h1', { tabindex: '-1' }, 'Upload DICOM');
  root.append(heading);
  // The shell shows the page only to these users too; the server decides ($import needs create on
  // ImagingStudy, ADR 0038); this keeps a patient's sign-in from even seeing the form.
  if (!grants(ctx.scopes || [], 'user', 'ImagingStudy', 'c')) {
    root.append(
      h('p', { class: 'upload-refused', role: 'alert' },
        'Upload is for administrators: this sign-in does not allow importing images ',
        '(it needs create on ImagingStudy for users, e.g. the scope user/ImagingStudy.c).'),
    );
    return;
  }

  const state = { items: [], busy: false, match: { patient: null, mrn: null, order: null } };
  const status = h('p', { class: 'upload-status', role: 'status', 'aria-live': 'polite' });

  // 1. files
  const input = h('input', {
    type: 'file', id: 'upload-files', multiple: true, class: 'visually-hidden',
    accept: '.dcm,.zip,application/dicom,application/zip,*/*',
  });
  const dropZone = h('div', { class: 'upload-dropzone', id: 'upload-dropzone' },
    h('p', {}, 'Drop DICOM files or zip archives here, or'),
    h('label', { for: 'upload-files', class: 'button' }, 'Choose files…'),
    input);
  const filesSection = h('section', { 'aria-labelledby': 'upload-files-heading' },
    h('h2', { id: 'upload-files-heading' }, '1. Files'), dropZone);
  const preview = h('div', { class: 'upload-preview', id: 'upload-preview' });
  filesSection.append(preview);

  // 2. patient and order
  const matchSection = buildMatching(ctx, state, () => refreshCoercion());
  const coercion = h('div', { id: 'upload-coercion', class: 'upload-coercion' });
  matchSection.append(coercion);

  // 3. import
  const importButton = h('button', { type: 'button', id: 'upload-import', disabled: true }, 'Import');
  const clearButton = h('button', { type: 'button', id: 'upload-clear', class: 'secondary' }, 'Clear');
  const results = h('div', { id: 'upload-results' });
  const importSection = h('section', { 'aria-labelledby': 'upload-import-heading' },
    h('h2', { id: 'upload-import-heading' }, '3. Import'),
    h('div', { class: 'upload-actions' }, importButton, clearButton), status, results);

  root.append(filesSection, matchSection, importSection);

  async function addFiles(files) {
    status.textContent = `Reading ${files.length} file(s)…`;
    for (const file of files) {
      const item = { id: uniqueId('upload-item'), inspected: null, error: null };
      state.items.push(item);
      try {
        item.inspected = await inspect(file);
      } catch (error) {
        item.inspected = { file, kind: 'unknown', entries: [], note: errorText(error) };
      }
    }
    renderPreview();
    refreshCoercion();
    importButton.disabled = state.busy || state.items.length === 0;
    const entries = state.items.reduce((n, item) => n + item.inspected.entries.length, 0);
    status.textContent = `${state.items.length} file(s) ready to import, ${entries} entries read.`;
  }

  input.addEventListener('change', () => {
    addFiles([...input.files]);
    input.value = '';
  });
  for (const type of ['dragenter', 'dragover']) {
    dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      dropZone.classList.add('dragging');
    });
  }
  dropZone.addEventListener('dragleave', () => dropZone.classList.remove('dragging'));
  dropZone.addEventListener('drop', (event) => {
    event.preventDefault();
    dropZone.classList.remove('dragging');
    addFiles([...event.dataTransfer.files]);
  });
  clearButton.addEventListener('click', () => {
    state.items = [];
    renderPreview();
    refreshCoercion();
    results.replaceChildren();
    importButton.disabled = true;
    status.textContent = 'Cleared.';
  });
  importButton.addEventListener('click', () => runImport());

  function renderPreview() {
    preview.replaceChildren();
    for (const item of state.items) preview.append(previewOf(item));
  }

  function refreshCoercion() {
    coercion.replaceChildren(coercionTable(state));
  }

  async function runImport() {
    state.busy = true;
    importButton.disabled = true;
    clearButton.disabled = true;
    results.replaceChildren();
    const query = importQuery(state.match);
    const items = state.items.slice();
    for (const [index, item] of items.entries()) {
      status.textContent = `Importing ${index + 1} of ${items.length}: ${item.inspected.file.name}`;
      await importOne(ctx, item, query, results);
    }
    status.textContent = `Import finished: ${items.length} file(s).`;
    clearButton.disabled = false;
    state.busy = false;
    state.items = [];
    renderPreview();
    refreshCoercion();
    const summary = results.querySelector('h3');
    if (summary) summary.focus();
  }
}

function previewOf(item) {
  const { file, kind, entries, note } = item.inspected;
  const caption = `${file.name} — ${kind === 'zip' ? 'zip archive' : 'file'}, ${formatBytes(file.size)}` +
    (kind === 'zip' ? `, ${entries.length} entries read` : '');
  const table = h('table', { class: 'upload-tags' },
    h('caption', {}, caption),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Entry'),
      TAGS.map(([, , label]) => h('th', { scope: 'col' }, label)))),
    h('tbody', {}, entries.map((entry) => {
      if (!entry.tags) {
        return h('tr', { class: 'unreadable' },
          h('th', { scope: 'row' }, entry.name),
          h('td', { colspan: TAGS.length }, entry.error || entry.note));
      }
      return h('tr', {},
        h('th', { scope: 'row' }, entry.name, entry.note ? h('span', { class: 'note' }, ` (${entry.note})`) : null),
        TAGS.map(([keyword]) => {
          const value = entry.tags[keyword];
          if (keyword === 'StudyInstanceUID' && value) {
            return h('td', { class: 'uid', title: value }, `…${value.slice(-12)}`);
          }
          return h('td', {}, value || '—');
        }));
    })));
  return h('div', { class: 'upload-file', id: item.id },
    h('div', { class: 'table-scroll', tabindex: '0', role: 'region', 'aria-label': `Tags of ${file.name}` }, table),
    note ? h('p', { class: 'note' }, note) : null);
}

/** The distinct identities in the upload and what each becomes: old -> new per tag. */
function coercionTable(state) {
  const target = targetIdentity(state.match);
  const keywords = Object.keys(target);
  if (!keywords.length) {
    return h('p', { id: 'upload-coercion-none' },
      'No patient chosen: the tags are imported as they are (nothing coerced).');
  }
  const identities = new Map();
  for (const item of state.items) {
    for (const entry of item.inspected.entries) {
      if (!entry.tags) continue;
      const key = keywords.map((k) => entry.tags[k] ?? '').join('\u0000');
      const known = identities.get(key);
      if (known) known.count += 1;
      else identities.set(key, { tags: entry.tags, count: 1 });
    }
  }
  const rows = [];
  for (const { tags, count } of identities.values()) {
    for (const keyword of keywords) {
      const before = tags[keyword] ?? '';
      const after = target[keyword];
      if (before === after) continue;
      rows.push(h('tr', {},
        h('th', { scope: 'row' }, keyword),
        h('td', { class: 'old' }, before || '(empty)'),
        h('td', { class: 'new' }, after || '(empty)'),
        h('td', {}, String(count))));
    }
  }
  const mrn = state.match.patient ? mrnOf(state.match.patient) : state.match.mrn;
  if (mrn) {
    // The server derives IssuerOfPatientID from the MRN's system with the site's own tables (none
    // for its own MRN system, a configured issuer, an OID): the browser says where it comes from.
    const issuers = new Map();
    for (const item of state.items) {
      for (const entry of item.inspected.entries) {
        if (entry.tags) issuers.set(entry.tags.IssuerOfPatientID || '', (issuers.get(entry.tags.IssuerOfPatientID || '') || 0) + 1);
      }
    }
    for (const [issuer, count] of issuers) {
      rows.push(h('tr', {},
        h('th', { scope: 'row' }, 'IssuerOfPatientID'),
        h('td', { class: 'old' }, issuer || '(empty)'),
        h('td', { class: 'derived' }, `from the MRN system ${mrn.system} (empty for this site\u2019s own MRNs)`),
        h('td', {}, String(count))));
    }
  }
  const issuerNote = h('p', { class: 'note' },
    'The result of the import names every tag the server changed.');
  if (!rows.length) {
    return h('p', {}, state.items.length
      ? 'The files already carry this identity: nothing will be coerced.'
      : `The identity set: ${keywords.map((k) => `${k} ${target[k] || '(empty)'}`).join(', ')}. Add files to see what changes.`);
  }
  return h('div', {}, h('table', { class: 'upload-coercion-table', id: 'upload-coercion-table' },
    h('caption', {}, 'What the import will coerce (the previous values go into the Original Attributes Sequence)'),
    h('thead', {}, h('tr', {},
      h('th', { scope: 'col' }, 'Tag'), h('th', { scope: 'col' }, 'In the files'),
      h('th', { scope: 'col' }, 'Stored as'), h('th', { scope: 'col' }, 'Entries'))),
    h('tbody', {}, rows)), issuerNote);
}

// -- patient and order matching -------------------------------------------------------------------

async function searchAll(client, queries) {
  const found = new Map();
  const answers = await Promise.allSettled(queries.map((query) => client.request(query)));
  for (const answer of answers) {
    if (answer.status !== 'fulfilled') continue;
    for (const entry of answer.value.entry || []) {
      const resource = entry.resource;
      if (resource && resource.id) found.set(`${resource.resourceType}/${resource.id}`, resource);
    }
  }
  const failed = answers.find((a) => a.status === 'rejected');
  return { resources: [...found.values()], failed: failed ? errorText(failed.reason) : null };
}

function buildMatching(ctx, state, changed) {
  const section = h('section', { 'aria-labelledby': 'upload-match-heading' },
    h('h2', { id: 'upload-match-heading' }, '2. Patient and order'),
    h('p', {}, 'The import stores the images under the patient and order chosen here: their ',
      'PatientID, name, birth date, sex and accession number replace those in the files.'));

  // Patient: search, or an MRN typed in.
  const patientQuery = h('input', { type: 'search', id: 'upload-patient-query', autocomplete: 'off' });
  const patientSearch = h('button', { type: 'button', id: 'upload-patient-search' }, 'Search patients');
  const patientResults = h('div', { id: 'upload-patient-results' });
  const mrnSystem = h('input', { type: 'text', id: 'upload-mrn-system', autocomplete: 'off', placeholder: 'urn:oid:…' });
  const mrnValue = h('input', { type: 'text', id: 'upload-mrn-value', autocomplete: 'off' });
  const mrnUse = h('button', { type: 'button', id: 'upload-mrn-use' }, 'Use this MRN');
  const keepButton = h('button', { type: 'button', id: 'upload-patient-none', class: 'secondary' }, 'Keep the files’ patient');
  const chosen = h('p', { id: 'upload-patient-chosen', class: 'chosen', 'aria-live': 'polite' }, 'Patient: as in the files.');

  const patientFieldset = h('fieldset', {},
    h('legend', {}, 'Patient'),
    h('div', { class: 'upload-row' },
      h('label', { for: 'upload-patient-query' }, 'MRN or name'), patientQuery, patientSearch),
    patientResults,
    h('div', { class: 'upload-row' },
      h('label', { for: 'upload-mrn-system' }, 'Or an MRN: system'), mrnSystem,
      h('label', { for: 'upload-mrn-value' }, 'value'), mrnValue, mrnUse),
    h('div', { class: 'upload-row' }, keepButton),
    chosen);

  // Order: by accession, or the chosen patient's.
  const orderQuery = h('input', { type: 'search', id: 'upload-order-query', autocomplete: 'off' });
  const orderSearch = h('button', { type: 'button', id: 'upload-order-search' }, 'Search by accession');
  const orderForPatient = h('button', { type: 'button', id: 'upload-order-for-patient', disabled: true }, 'Orders of the patient');
  const orderNone = h('button', { type: 'button', id: 'upload-order-none', class: 'secondary' }, 'No order');
  const orderResults = h('div', { id: 'upload-order-results' });
  const orderChosen = h('p', { id: 'upload-order-chosen', class: 'chosen', 'aria-live': 'polite' }, 'Order: none (the accession number stays as in the files).');
  const orderFieldset = h('fieldset', {},
    h('legend', {}, 'Order'),
    h('div', { class: 'upload-row' },
      h('label', { for: 'upload-order-query' }, 'Accession number'), orderQuery, orderSearch, orderForPatient, orderNone),
    orderResults, orderChosen);
  section.append(patientFieldset, orderFieldset);

  function choosePatient(patient, mrn) {
    state.match.patient = patient;
    state.match.mrn = mrn;
    if (patient) {
      const identifier = mrnOf(patient);
      chosen.textContent = `Patient: ${displayName(patient)} (Patient/${patient.id}` +
        (identifier ? `, MRN ${identifier.value})` : ')');
    } else if (mrn) {
      chosen.textContent = `Patient: the one with MRN ${mrn.system}|${mrn.value}.`;
    } else {
      chosen.textContent = 'Patient: as in the files.';
      chooseOrder(null);
      orderResults.replaceChildren();
    }
    orderForPatient.disabled = !patient;
    changed();
  }

  function chooseOrder(order) {
    state.match.order = order;
    if (order) {
      const subject = (order.subject || {}).reference || 'no subject';
      const mismatch = state.match.patient && subject !== `Patient/${state.match.patient.id}`;
      orderChosen.textContent = `Order: ServiceRequest/${order.id}, accession ${accessionOf(order) || '(none)'}, for ${subject}.` +
        (mismatch ? ' It is for another patient: the server refuses this import.' : '');
      orderChosen.classList.toggle('warning', Boolean(mismatch));
    } else {
      orderChosen.textContent = 'Order: none (the accession number stays as in the files).';
      orderChosen.classList.remove('warning');
    }
    changed();
  }

  function radioList(container, name, legend, resources, label, onChoose) {
    if (!resources.length) {
      container.replaceChildren(h('p', { role: 'status' }, `No ${legend.toLowerCase()} found.`));
      return;
    }
    const fieldset = h('fieldset', { class: 'upload-choices' }, h('legend', {}, legend));
    for (const resource of resources) {
      const id = uniqueId(name);
      const radio = h('input', { type: 'radio', name, id, value: `${resource.resourceType}/${resource.id}` });
      radio.addEventListener('change', () => onChoose(resource));
      fieldset.append(h('div', { class: 'choice' }, radio, h('label', { for: id }, label(resource))));
    }
    container.replaceChildren(fieldset);
  }

  async function findPatients() {
    const text = patientQuery.value.trim();
    if (!text) return;
    patientResults.replaceChildren(h('p', { role: 'status' }, 'Searching…'));
    const term = encodeURIComponent(text);
    const { resources, failed } = await searchAll(ctx.client, [
      `Patient?identifier=${term}&_count=20`,
      `Patient?name=${term}&_count=20`,
    ]);
    radioList(patientResults, 'upload-patient', 'Matching patients', resources, (patient) => {
      const identifier = mrnOf(patient);
      return `${displayName(patient)} — MRN ${identifier ? identifier.value : '(none)'} — born ${patient.birthDate || '?'} — ${patient.gender || '?'} (Patient/${patient.id})`;
    }, (patient) => choosePatient(patient, null));
    if (failed && !resources.length) patientResults.append(h('p', { role: 'alert' }, `Search failed: ${failed}`));
  }

  async function findOrders(query) {
    orderResults.replaceChildren(h('p', { role: 'status' }, 'Searching…'));
    const { resources, failed } = await searchAll(ctx.client, [query]);
    radioList(orderResults, 'upload-order', 'Matching orders', resources, (order) => {
      const what = (order.code || {}).text || (((order.code || {}).coding || [])[0] || {}).display || 'order';
      return `${accessionOf(order) || '(no accession)'} — ${what} — ${order.status} — for ${(order.subject || {}).reference || '?'} (ServiceRequest/${order.id})`;
    }, chooseOrder);
    if (failed && !resources.length) orderResults.append(h('p', { role: 'alert' }, `Search failed: ${failed}`));
  }

  patientSearch.addEventListener('click', findPatients);
  patientQuery.addEventListener('keydown', (event) => {
    if (event.key === 'Enter') findPatients();
  });
  mrnUse.addEventListener('click', () => {
    const system = mrnSystem.value.trim();
    const value = mrnValue.value.trim();
    if (!system || !value) {
      chosen.textContent = 'An MRN needs its system (whose number is it?) and its value.';
      return;
    }
    choosePatient(null, { system, value });
  });
  keepButton.addEventListener('click', () => choosePatient(null, null));
  orderSearch.addEventListener('click', () => {
    const text = orderQuery.value.trim();
    if (text) findOrders(`ServiceRequest?identifier=${encodeURIComponent(text)}&_count=20`);
  });
  orderQuery.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && orderQuery.value.trim()) {
      findOrders(`ServiceRequest?identifier=${encodeURIComponent(orderQuery.value.trim())}&_count=20`);
    }
  });
  orderForPatient.addEventListener('click', () => {
    if (state.match.patient) findOrders(`ServiceRequest?subject=Patient/${encodeURIComponent(state.match.patient.id)}&_count=20`);
  });
  orderNone.addEventListener('click', () => chooseOrder(null));
  return section;
}

// -- importing ------------------------------------------------------------------------------------

function importQuery(match) {
  const params = new URLSearchParams();
  if (match.patient) params.set('patient', `Patient/${match.patient.id}`);
  else if (match.mrn) params.set('patient-identifier', `${match.mrn.system}|${match.mrn.value}`);
  if (match.order && (match.patient || match.mrn)) params.set('order', `ServiceRequest/${match.order.id}`);
  const text = params.toString();
  return text ? `?${text}` : '';
}

function accessToken(ctx) {
  return ctx.token || (((ctx.client || {}).state || {}).tokenResponse || {}).access_token || null;
}

/** POST one file with upload progress (XHR: fetch has no upload progress); resolves the response. */
function post(url, file, headers, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', url);
    for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener('progress', (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener('load', () => resolve({
      status: xhr.status,
      text: xhr.responseText,
      header: (name) => xhr.getResponseHeader(name),
    }));
    xhr.addEventListener('error', () => reject(new Error('the upload failed (network error)')));
    xhr.send(file);
  });
}

function outcomeText(text, status) {
  try {
    const body = JSON.parse(text);
    if (body.resourceType === 'OperationOutcome') {
      return body.issue.map((issue) => issue.diagnostics || issue.code).join('; ');
    }
  } catch (_) { /* not JSON */ }
  return `HTTP ${status}`;
}

async function importOne(ctx, item, query, results) {
  const { file, kind } = item.inspected;
  const box = h('section', { class: 'upload-result', 'aria-label': `Import of ${file.name}` });
  const progress = h('progress', { max: '100', value: '0', 'aria-label': `Upload of ${file.name}` });
  const phase = h('span', { class: 'phase' }, 'uploading…');
  box.append(h('h3', { tabindex: '-1' }, file.name), h('div', { class: 'upload-progress' }, progress, phase));
  results.append(box);

  const token = accessToken(ctx);
  const asynchronous = kind === 'zip' || file.size >= ASYNC_FROM_BYTES;
  const headers = {
    'Content-Type': kind === 'zip' ? 'application/zip' : 'application/dicom',
    Accept: 'application/fhir+json',
    ...(token ? { Authorization: `Bearer ${token}` } : {}),
    ...(asynchronous ? { Prefer: 'respond-async' } : {}),
  };
  const url = `${ctx.fhirBase.replace(/\/$/, '')}/ImagingStudy/$import${query}`;
  let response;
  try {
    response = await post(url, file, headers, (loaded, total) => {
      progress.value = Math.round((100 * loaded) / total);
      phase.textContent = `uploading… ${formatBytes(loaded)} of ${formatBytes(total)}`;
    });
  } catch (error) {
    box.append(h('p', { role: 'alert', class: 'error' }, errorText(error)));
    return;
  }
  progress.value = 100;
  if (response.status === 202) {
    phase.textContent = 'uploaded; the server is importing…';
    response = await poll(response.header('Content-Location'), token, phase);
  }
  if (response.status !== 200) {
    phase.textContent = 'not imported';
    box.append(h('p', { role: 'alert', class: 'error', 'data-status': String(response.status) },
      `The server refused the import (${response.status}): ${outcomeText(response.text, response.status)}`));
    return;
  }
  phase.textContent = 'done';
  box.append(resultTable(ctx, JSON.parse(response.text), kind === 'zip' ? null : file.name));
}

/** Poll the job of an asynchronous $import until it is done, showing its X-Progress. */
async function poll(location, token, phase) {
  for (;;) {
    const answer = await fetch(location, {
      headers: { Accept: 'application/fhir+json', ...(token ? { Authorization: `Bearer ${token}` } : {}) },
    });
    if (answer.status !== 202) {
      return { status: answer.status, text: await answer.text(), header: (name) => answer.headers.get(name) };
    }
    phase.textContent = `importing: ${answer.headers.get('X-Progress') || 'running'}`;
    const wait = Math.min(5, Number(answer.headers.get('Retry-After')) || 1);
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
  }
}

function partsOf(parameter) {
  const item = { reasons: [] };
  for (const part of parameter.part || []) {
    const key = Object.keys(part).find((k) => k.startsWith('value'));
    const value = key === 'valueReference' ? part[key].reference : part[key];
    if (part.name === 'reason') item.reasons.push(value);
    else item[part.name] = value;
  }
  return item;
}

function reasonsCell(reasons) {
  if (!reasons.length) return '—';
  // dciodvfy's Type 2/2C remarks are many and rarely matter here: folded, the rest shown.
  const validator = reasons.filter((r) => r.startsWith('dciodvfy:'));
  const others = reasons.filter((r) => !r.startsWith('dciodvfy:'));
  const shown = validator.length > 2 ? others : reasons;
  return [
    h('ul', {}, shown.map((r) => h('li', {}, r))),
    validator.length > 2
      ? h('details', {}, h('summary', {}, `${validator.length} validator remarks (dciodvfy)`),
        h('ul', {}, validator.map((r) => h('li', {}, r))))
      : null,
  ];
}

function resultTable(ctx, parameters, singleName) {
  const all = parameters.parameter || [];
  const summary = partsOf(all.find((p) => p.name === 'summary') || { part: [] });
  const studies = all.filter((p) => p.name === 'study').map(partsOf);
  const instances = all.filter((p) => p.name === 'instance').map(partsOf);
  const counts = Object.keys(STATUS_TEXT)
    .filter((status) => summary[status])
    .map((status) => `${summary[status]} ${STATUS_TEXT[status]}`);
  const wrapper = h('div', { class: 'upload-outcome' },
    h('p', { class: 'upload-summary' }, counts.length ? counts.join(', ') : 'nothing in the upload'));
  const stored = studies.filter((s) => s.outcome === 'stored');
  if (stored.length) {
    wrapper.append(h('ul', { class: 'upload-studies' }, stored.map((study) => h('li', {},
      `Study …${study.studyInstanceUid.slice(-16)} stored `,
      typeof ctx.openViewer === 'function'
        ? h('button', { type: 'button', class: 'link', onclick: () => ctx.openViewer(study.studyInstanceUid) }, 'Open in viewer')
        : null))));
  }
  wrapper.append(h('div', { class: 'table-scroll', tabindex: '0', role: 'region', 'aria-label': 'Per-instance result' },
    h('table', { class: 'upload-instances' },
      h('caption', {}, 'Per-instance result'),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Entry'), h('th', { scope: 'col' }, 'Result'),
        h('th', { scope: 'col' }, 'SOP Instance UID'), h('th', { scope: 'col' }, 'Reason'))),
      h('tbody', {}, instances.map((instance) => h('tr', { class: `status-${instance.status}`, 'data-status': instance.status },
        h('th', { scope: 'row' }, singleName && instance.entry === '(body)' ? singleName : instance.entry),
        h('td', { class: 'status' }, STATUS_TEXT[instance.status] || instance.status),
        h('td', { class: 'uid', title: instance.sopInstanceUid || '' }, instance.sopInstanceUid ? `…${instance.sopInstanceUid.slice(-16)}` : '—'),
        h('td', { class: 'reasons' }, reasonsCell(instance.reasons))))))));
  return wrapper;
}
