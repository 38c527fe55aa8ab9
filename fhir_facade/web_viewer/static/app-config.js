/* OHIF 3.13 app-config.js written by fhir-facade (ADR 0044); OHIF's shipped one (demo servers) is
 * never served. One DICOMweb data source, the facade's own /dicom-web proxy; no other host. The
 * bearer token is the one the SMART app's fhirclient keeps in sessionStorage, handed to OHIF through
 * its userAuthenticationService, so it never appears in a URL. */
(function () {
  'use strict';
  var facade = __FACADE_SETTINGS__;

  // index.html's two inline scripts, moved here: the CSP allows no inline script.
  window.PUBLIC_URL = facade.publicPath;
  window.browserImportFunction = function (name) {
    return import(name);
  };

  /** fhirclient's state of the app's session in this tab: {key, state}, or null. */
  function smartSession() {
    try {
      var key = JSON.parse(window.sessionStorage.getItem('SMART_KEY') || 'null');
      if (typeof key !== 'string' || !key) {
        return null;
      }
      var state = JSON.parse(window.sessionStorage.getItem(key) || 'null');
      return state ? { key: key, state: state } : null;
    } catch (error) {
      return null;
    }
  }

  /** Seconds before expiry at which the token is renewed (as the app's shell, app.js, does). */
  var RENEW_AHEAD = 30;
  var renewTimer = null;
  var renewRetries = 0;

  /** Keep the access token fresh while OHIF is open (SMART App Launch 2.x step 7, ADR 0047): a
   * read takes longer than one token lives, and the app's shell, which renews it elsewhere, is not
   * running in this tab now. The renewed token is written back into fhirclient's state, so the app
   * finds it when the user goes back. Without a refresh token (no online_access) nothing happens:
   * the next 401 shows the sign-in message. */
  function scheduleRenewal() {
    window.clearTimeout(renewTimer);
    var session = smartSession();
    var state = session && session.state;
    var response = (state && state.tokenResponse) || {};
    if (!response.refresh_token || !state.tokenUri || typeof state.expiresAt !== 'number') {
      return;
    }
    var lifetime = Number(response.expires_in) || 300;
    var due = state.expiresAt - Math.min(RENEW_AHEAD, lifetime / 4);
    renewTimer = window.setTimeout(renewToken, Math.max(1, due - Date.now() / 1000) * 1000);
  }

  function renewToken() {
    var session = smartSession();
    var state = session && session.state;
    var refresh = state && state.tokenResponse && state.tokenResponse.refresh_token;
    if (!refresh) {
      return;
    }
    var form = new URLSearchParams();
    form.set('grant_type', 'refresh_token');
    form.set('refresh_token', refresh);
    form.set('client_id', state.clientId); // a public client is known by its id alone (RFC 6749 6)
    window
      .fetch(state.tokenUri, {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' },
        body: form.toString(),
        credentials: 'omit',
      })
      .then(function (response) {
        if (!response.ok) {
          var refused = new Error('token endpoint answered ' + response.status);
          refused.status = response.status;
          throw refused;
        }
        return response.json();
      })
      .then(function (json) {
        var now = smartSession();
        if (!now || now.key !== session.key) {
          return; // signed out (or another session) meanwhile
        }
        now.state.tokenResponse = Object.assign({}, now.state.tokenResponse, json);
        now.state.expiresAt = Math.floor(Date.now() / 1000) + (Number(json.expires_in) || 300);
        window.sessionStorage.setItem(now.key, JSON.stringify(now.state));
        renewRetries = 0;
        scheduleRenewal();
      })
      .catch(function (error) {
        // A refusal (400 invalid_grant: used up, revoked, expired) ends the session; a busy server
        // (429) or a lost connection did not use the token up: try again a few times.
        var status = error && error.status;
        var transient = !status || status === 429 || status >= 500;
        if (transient && renewRetries < 3) {
          renewRetries += 1;
          window.clearTimeout(renewTimer);
          renewTimer = window.setTimeout(renewToken, 2000 * renewRetries);
        }
      });
  }

  document.addEventListener('visibilitychange', function () {
    // Hidden tabs' timers are slowed down: a tab shown again checks at once.
    if (document.visibilityState === 'visible') {
      var session = smartSession();
      var state = session && session.state;
      if (state && typeof state.expiresAt === 'number' && state.expiresAt - RENEW_AHEAD <= Date.now() / 1000) {
        renewToken();
      }
    }
  });

  /** fhirclient (2.x) stores its state under a random key; the entry SMART_KEY names that key
   * (both JSON-encoded). The token is tokenResponse.access_token; expiresAt is in seconds. */
  function smartToken() {
    try {
      var key = JSON.parse(window.sessionStorage.getItem('SMART_KEY') || 'null');
      if (typeof key !== 'string' || !key) {
        return null;
      }
      var state = JSON.parse(window.sessionStorage.getItem(key) || 'null');
      var token = state && state.tokenResponse && state.tokenResponse.access_token;
      if (typeof token !== 'string' || !token) {
        return null;
      }
      if (typeof state.expiresAt === 'number' && state.expiresAt * 1000 <= Date.now()) {
        return null;
      }
      return token;
    } catch (error) {
      return null;
    }
  }

  function authorizationHeader() {
    var token = smartToken();
    return token ? { Authorization: 'Bearer ' + token } : {};
  }

  /** Shown instead of OHIF when the facade wants a token and the tab has none (or only an
   * expired one): a link to the SMART app's launch page, which signs the user in. */
  function showSignIn() {
    var root = document.getElementById('root') || document.body;
    while (root.firstChild) {
      root.removeChild(root.firstChild);
    }
    var main = document.createElement('main');
    main.id = 'facade-sign-in';
    main.style.maxWidth = '40rem';
    main.style.margin = '4rem auto';
    main.style.padding = '0 1rem';
    main.style.font = '16px/1.5 system-ui, sans-serif';
    main.style.color = '#f0f0f0';
    // OHIF's stylesheet resets headings and margins (Tailwind's preflight): set them here.
    var heading = document.createElement('h1');
    heading.textContent = 'Sign in to view images';
    heading.style.fontSize = '1.5rem';
    heading.style.fontWeight = '600';
    heading.style.margin = '0 0 1rem';
    var text = document.createElement('p');
    text.style.margin = '0 0 1rem';
    text.textContent =
      'The viewer reads images with the token of your SMART app session, and this tab has none ' +
      '(or it has expired). Open the imaging app, sign in, then open the study again.';
    var link = document.createElement('a');
    link.href = facade.launchUrl;
    link.textContent = 'Open the imaging app and sign in';
    link.style.color = '#8cc8ff';
    link.style.textDecoration = 'underline';
    main.appendChild(heading);
    main.appendChild(text);
    main.appendChild(link);
    root.appendChild(main);
    document.title = 'Sign in - Viewer';
  }

  /** An OHIF extension given as an object in config.extensions (appInit's loadModule passes
   * objects through): its preRegistration runs once the services exist and makes every DICOMweb
   * request (QIDO, WADO-RS metadata, frames, bulk data, thumbnails) carry the SMART token. */
  var smartTokenExtension = {
    id: 'fhir-facade-smart-token',
    preRegistration: function (args) {
      args.servicesManager.services.userAuthenticationService.setServiceImplementation({
        getAuthorizationHeader: authorizationHeader,
        handleUnauthenticated: function () {
          showSignIn();
          return null;
        },
      });
    },
  };

  window.config = {
    name: 'fhir-facade',
    routerBasename: facade.publicPath,
    extensions: [smartTokenExtension],
    modes: [],
    // No first-use tour: OHIF's onboarding pop-up covers the image each time a tab's storage is new
    // (every SMART session starts in a fresh one), and radiologists know how to scroll.
    customizationService: { 'ohif.tours': { $set: [] } },
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    groupEnabledModesFirst: true,
    allowMultiSelectExport: false,
    investigationalUseDialog: { option: 'never' },
    maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
    showErrorDetails: 'production',
    defaultDataSourceName: 'facade',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'facade',
        configuration: {
          friendlyName: 'fhir-facade DICOMweb',
          name: 'facade',
          qidoRoot: facade.dicomweb,
          wadoRoot: facade.dicomweb,
          wadoUriRoot: facade.dicomweb,
          qidoSupportsIncludeField: true,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          supportsReject: false,
          dicomUploadEnabled: false,
          omitQuotationForMultipartRequest: true,
          bulkDataURI: { enabled: true },
        },
      },
    ],
    httpErrorHandler: function (error) {
      if (error && error.status === 401 && facade.authRequired) {
        showSignIn();
      }
    },
  };

  // OHIF starts only with a token where the facade wants one; the entry bundle is added here
  // (not by index.html) so that without one nothing is requested in vain.
  function start() {
    if (facade.authRequired && !smartToken()) {
      showSignIn();
      return;
    }
    scheduleRenewal();
    var script = document.createElement('script');
    script.src = facade.publicPath + facade.appBundle;
    document.head.appendChild(script);
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
})();
