// Patient imaging (issue 18, ADR 0043): the patient's studies as a timeline, newest first, each
// with its AI result tile and the radiologist's report status, and "Open in viewer".
//
// Data, all through the facade with the user's token:
// - ImagingStudy?patient=<id>: the studies (virtual, from the PACS);
// - DiagnosticReport?patient=<id>&_include=DiagnosticReport:result: the reports and their
//   Observations. The AI result is what $analyze writes (fhir_facade/analyze/fhir_report.py): a
//   `preliminary` report with no resultsInterpreter, its conclusionCode the finding, its finding
//   Observation (code DCM 121071) with one component per class ("Score for <label>", a score
//   0..1), and, when the saliency map is on (ADR 0035), `media` pointing at a contained Media with
//   the PNG. A superseded AI result is `cancelled` (ADR 0031) and not shown. Any other report of
//   the study (a radiologist's, or the AI report once signed) is the report whose status is shown.
import { formatDateTime, h, loadStylesheet, referenceId } from "../smart.js";

const DCM_FINDING = "121071";
const SNOMED = "http://snomed.info/sct";
const NO_ABNORMALITY = "281900007";
const UNDETERMINED = "373068000";
const SIGNED = new Set(["final", "amended", "corrected", "appended"]);
const WITHDRAWN = new Set(["cancelled", "entered-in-error"]);

function studyUid(study) {
  const identifier = (study.identifier || []).find((i) => i.system === "urn:dicom:uid");
  return identifier ? identifier.value.replace(/^urn:oid:/, "") : study.id;
}

function accession(study) {
  const identifier = (study.identifier || []).find((i) =>
    ((i.type || {}).coding || []).some((c) => c.code === "ACSN"),
  );
  return identifier ? identifier.value : null;
}

function isMachineResult(report) {
  return report.status === "preliminary" && !(report.resultsInterpreter || []).length && Boolean(report.result);
}

function newestFirst(a, b) {
  return String(b.issued || "").localeCompare(String(a.issued || ""));
}

/** The studies' reports: { studyId: { ai, signed } } with the newest of each kind. */
function reportsByStudy(reports) {
  const byStudy = {};
  for (const report of [...reports].sort(newestFirst)) {
    if (WITHDRAWN.has(report.status)) continue;
    for (const link of report.imagingStudy || []) {
      const id = referenceId(link.reference, "ImagingStudy");
      if (!id) continue;
      const entry = (byStudy[id] ||= { ai: null, report: null });
      if (isMachineResult(report)) entry.ai ||= report;
      else entry.report ||= report;
    }
  }
  return byStudy;
}

function findingObservation(report, observations) {
  for (const link of report.result || []) {
    const observation = observations.get(referenceId(link.reference, "Observation"));
    if (observation && ((observation.code || {}).coding || []).some((c) => c.code === DCM_FINDING)) {
      return observation;
    }
  }
  return null;
}

function findingState(report) {
  const coding = ((report.conclusionCode || [])[0] || {}).coding || [];
  const snomed = coding.find((c) => c.system === SNOMED) || coding[0] || {};
  const display = snomed.display || ((report.conclusionCode || [])[0] || {}).text || "Unknown";
  if (snomed.system === SNOMED && snomed.code === NO_ABNORMALITY) {
    return { kind: "absent", label: "No finding", display };
  }
  if (snomed.system === SNOMED && snomed.code === UNDETERMINED) {
    return { kind: "undetermined", label: "Not assessed", display };
  }
  return { kind: "present", label: "Finding present", display };
}

function classScores(observation) {
  return (observation ? observation.component || [] : [])
    .filter((c) => c.valueQuantity && typeof c.valueQuantity.value === "number")
    .map((c) => {
      const coding = (c.code.coding || [])[0] || {};
      return {
        label: coding.display || (c.code.text || "").replace(/^Score for /, ""),
        code: coding.code,
        score: c.valueQuantity.value,
      };
    })
    .sort((a, b) => b.score - a.score);
}

function saliencyImage(report) {
  const contained = new Map((report.contained || []).map((r) => [`#${r.id}`, r]));
  for (const media of report.media || []) {
    const resource = contained.get((media.link || {}).reference);
    const content = resource && resource.content;
    if (content && content.contentType === "image/png" && content.data) {
      return { src: `data:image/png;base64,${content.data}`, title: content.title, comment: media.comment };
    }
  }
  return null;
}

function percent(score) {
  return `${(score * 100).toFixed(1)} %`;
}

function aiTile(report, observations, headingId) {
  if (!report) {
    return h(
      "section",
      { className: "tile ai-tile empty", "aria-labelledby": headingId },
      h("h3", { id: headingId }, "AI result"),
      h("p", { className: "muted" }, "No AI result for this study yet."),
    );
  }
  const finding = findingState(report);
  const observation = findingObservation(report, observations);
  const scores = classScores(observation);
  const method = observation && observation.method ? observation.method.text : null;
  const conclusionCode = (((report.conclusionCode || [])[0] || {}).coding || [])[0] || {};
  const saliency = saliencyImage(report);
  const table = scores.length
    ? h(
        "table",
        { className: "scores" },
        h("caption", {}, "Probability per class"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Class"), h("th", { scope: "col" }, "Probability"))),
        h(
          "tbody",
          {},
          scores.map((s) =>
            h(
              "tr",
              { className: s.code && s.code === conclusionCode.code ? "chosen" : null },
              h("th", { scope: "row" }, s.label),
              h(
                "td",
                {},
                h("meter", { min: 0, max: 1, value: s.score, "aria-label": `${s.label} probability` }),
                h("span", { className: "score" }, percent(s.score)),
              ),
            ),
          ),
        ),
      )
    : h("p", { className: "muted" }, "The model's per-class scores are not available.");
  return h(
    "section",
    { className: `tile ai-tile ${finding.kind}`, "aria-labelledby": headingId, "data-report": report.id },
    h(
      "div",
      { className: "tile-head" },
      h("h3", { id: headingId }, "AI result"),
      h("span", { className: "badge preliminary" }, "Preliminary · machine-generated"),
    ),
    h(
      "div",
      { className: "tile-body" },
      h(
        "div",
        { className: "tile-main" },
        h(
          "p",
          { className: "finding" },
          h("span", { className: `badge ${finding.kind}` }, finding.label),
          " ",
          h("strong", {}, finding.display),
        ),
        table,
        method ? h("p", { className: "method muted" }, `How the scores were made: ${method}`) : null,
        h(
          "p",
          { className: "model muted" },
          `${(report.code || {}).text || "AI analysis"} · ${formatDateTime(report.issued) || ""}`,
        ),
        report.conclusion ? h("p", { className: "conclusion" }, report.conclusion) : null,
      ),
      saliency
        ? h(
            "figure",
            { className: "saliency" },
            h("img", { src: saliency.src, alt: saliency.title || "Saliency map of the key image" }),
            h("figcaption", {}, saliency.comment || saliency.title || "Saliency map"),
          )
        : null,
    ),
  );
}

function reportStatus(report) {
  if (!report) {
    return h("p", { className: "report-status" }, h("span", { className: "badge undetermined" }, "Not reported"), " No radiologist's report yet.");
  }
  const signed = SIGNED.has(report.status);
  const by = (report.resultsInterpreter || []).map((r) => r.display || r.reference).join(", ");
  return h(
    "p",
    { className: "report-status", "data-report": report.id },
    h("span", { className: `badge ${signed ? "final" : "preliminary"}` }, signed ? `Signed · ${report.status}` : `Draft · ${report.status}`),
    " Radiologist's report",
    by ? ` by ${by}` : "",
    report.issued ? `, ${formatDateTime(report.issued)}` : "",
    report.conclusion ? h("span", { className: "report-conclusion" }, `: ${report.conclusion}`) : ".",
  );
}

function studyItem(study, reports, observations, ctx) {
  const uid = studyUid(study);
  const headingId = `study-${study.id}`;
  const modalities = (study.modality || []).map((m) => m.code).join(", ");
  const facts = [
    modalities || null,
    study.numberOfSeries != null ? `${study.numberOfSeries} series` : null,
    study.numberOfInstances != null ? `${study.numberOfInstances} images` : null,
    accession(study) ? `accession ${accession(study)}` : null,
  ].filter(Boolean);
  const viewer = h(
    "button",
    { type: "button", className: "open-viewer", onclick: () => ctx.openViewer(uid) },
    "Open in viewer",
  );
  viewer.setAttribute("aria-describedby", headingId);
  return h(
    "li",
    { className: "study", "data-study-uid": uid },
    h(
      "article",
      { "aria-labelledby": headingId },
      h(
        "div",
        { className: "study-head" },
        h(
          "div",
          {},
          h("h2", { id: headingId }, study.description || "Imaging study", h("span", { className: "when" }, ` · ${formatDateTime(study.started) || "date unknown"}`)),
          h("p", { className: "facts muted" }, facts.join(" · ")),
        ),
        viewer,
      ),
      reportStatus(reports.report),
      aiTile(reports.ai, observations, `${headingId}-ai`),
    ),
  );
}

async function searchAll(ctx, url) {
  return ctx.client.request(url, { pageLimit: 0, flat: true });
}

async function loadReports(ctx, patientId) {
  const base = `DiagnosticReport?patient=${encodeURIComponent(patientId)}&_count=100`;
  let resources;
  try {
    resources = await searchAll(ctx, `${base}&_include=DiagnosticReport:result`);
  } catch (error) {
    if (error.status === 401) throw error;
    resources = await searchAll(ctx, base); // a server without the _include
  }
  const reports = resources.filter((r) => r.resourceType === "DiagnosticReport");
  const observations = new Map(resources.filter((r) => r.resourceType === "Observation").map((o) => [o.id, o]));
  return { reports, observations };
}

function patientChooser(root, ctx) {
  const input = h("input", { id: "patient-id", name: "patient", required: true, autocomplete: "off" });
  const form = h(
    "form",
    { className: "patient-chooser" },
    h("label", { for: "patient-id" }, "Patient id"),
    input,
    h("button", { type: "submit" }, "Open"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value.trim()) ctx.navigate(`#/patient/${encodeURIComponent(input.value.trim())}`);
  });
  root.append(h("p", {}, "No patient is selected. Open one by its id:"), form);
}

export async function render(root, ctx) {
  await loadStylesheet(new URL("./patient.css", import.meta.url));
  root.append(h("h1", {}, "Patient imaging"));
  const patientId = ctx.patientId || ctx.params[0] || null;
  if (!patientId) {
    patientChooser(root, ctx);
    return;
  }
  if (ctx.patientId && ctx.params[0] && ctx.params[0] !== ctx.patientId) {
    root.append(h("p", { role: "alert" }, "This sign-in is for one patient only."));
    return;
  }
  const status = h("p", { role: "status" }, "Loading studies…");
  root.append(status);
  const [studies, { reports, observations }] = await Promise.all([
    searchAll(ctx, `ImagingStudy?patient=${encodeURIComponent(patientId)}&_count=100`),
    loadReports(ctx, patientId),
  ]);
  const byStudy = reportsByStudy(reports);
  const ordered = studies
    .filter((s) => s.resourceType === "ImagingStudy")
    .sort((a, b) => String(b.started || "").localeCompare(String(a.started || "")));
  status.textContent = ordered.length
    ? `${ordered.length} ${ordered.length === 1 ? "study" : "studies"}, newest first.`
    : "No imaging studies for this patient.";
  if (!ordered.length) return;
  root.append(
    h(
      "ol",
      { className: "timeline", "aria-label": "Imaging studies, newest first" },
      ordered.map((study) => studyItem(study, byStudy[study.id] || {}, observations, ctx)),
    ),
  );
}
