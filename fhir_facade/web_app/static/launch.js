// The app's SMART launch URL (SMART App Launch 2.x app-launch.html, ADR 0043).
// - EHR launch: ?iss=<FHIR base>&launch=<opaque> (the built-in server's /auth/ehr-launch makes one,
//   ADR 0042); the app asks for `launch` and the patient comes from the launch context.
// - Standalone: ?profile=patient|reader|admin against the facade's own FHIR base (../fhir).
// fhirclient reads <iss>/.well-known/smart-configuration for the endpoints, so an external
// authorization server named there works the same way. PKCE S256 is required (public client).
// Every scope set asks for online_access: a refresh token keeps the session alive past the access
// token's few minutes, until sign-out or the server's limit (ADR 0047).

// Keep equal to fhir_facade/web_app/registration.py PROFILE_SCOPES (a test compares them).
export const CLIENT_ID = "imaging-app";
export const PROFILE_SCOPES = {
  patient: "openid fhirUser online_access launch/patient patient/*.rs",
  reader: "openid fhirUser online_access user/*.rs user/Task.u user/DiagnosticReport.cu user/Communication.cu",
  admin: "openid fhirUser online_access user/*.rs user/ImagingStudy.c",
};
export const EHR_LAUNCH_SCOPE = "openid fhirUser online_access launch patient/*.rs";

const status = document.getElementById("launch-status");
const problem = document.getElementById("launch-error");

function fail(message) {
  status.textContent = "Sign-in could not start.";
  problem.textContent = message;
}

function start() {
  const params = new URLSearchParams(location.search);
  if (!window.FHIR) {
    fail("The app's browser library is not installed on this server: run `bash scripts/setup.sh run`.");
    return;
  }
  const redirectUri = new URL("index.html", location.href).href;
  const options = { clientId: CLIENT_ID, redirectUri, pkceMode: "required" };
  if (params.has("launch") || params.has("iss")) {
    if (!params.get("iss") || !params.get("launch")) {
      fail("An EHR launch needs both iss and launch in the URL.");
      return;
    }
    status.textContent = "Launching from your EHR…";
    // fhirclient takes iss and launch from the URL itself.
    FHIR.oauth2.authorize({ ...options, scope: EHR_LAUNCH_SCOPE }).catch((error) => fail(String(error)));
    return;
  }
  const profile = params.get("profile");
  if (!profile) {
    status.textContent = "Not signed in.";
    document.getElementById("profiles").hidden = false;
    return;
  }
  const scope = PROFILE_SCOPES[profile];
  if (!scope) {
    fail(`Unknown profile ${JSON.stringify(profile)}: use patient, reader or admin.`);
    document.getElementById("profiles").hidden = false;
    return;
  }
  status.textContent = "Redirecting to sign-in…";
  const iss = new URL("../fhir", location.href).href;
  FHIR.oauth2.authorize({ ...options, iss, scope }).catch((error) =>
    // The usual cause: a facade without SMART (FACADE_AUTH=none) serves no smart-configuration.
    fail(`${error.message || error} (is the facade started with FACADE_AUTH=smart?)`),
  );
}

start();
