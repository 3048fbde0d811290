// Nanofleet dashboard: a single-page operations console over the server's JSON API.
//
// Routes (hash based, so the server serves one page):
//   #/                 fleet overview: totals, one card per hospital site, active alarms
//   #/devices?site=ID  device table with a site filter
//   #/devices/ID       one device: presence, last values, alarms, live telemetry chart
//   #/enroll           enrollment tokens: create one for a site, list them with their state
//   #/recipes[/ID[/N]] recipe versions with their signatures; ID (version N, or the newest)
//                      selected: formula, procedure, release criteria, delivery to devices
//   #/batches[/ID]     batch records by disposition; ID selected: QC against the release
//                      criteria, phases (setpoints vs actuals), alarms, every signature, and
//                      links to the printable record and the signed JSON
//
// Every view polls once a second and updates its DOM in place instead of rebuilding it,
// so a click, a hover or an open <select> is not lost to a refresh.
//
// The API needs a session cookie (HttpOnly, so this script never sees it). Any answer 401
// puts the sign-in form in place of the view and stops polling; signing in as the same
// person brings the view back as it was, a different person gets the page rebuilt.
'use strict';

(() => {
  const POLL_MS = 1000;
  const REQUEST_TIMEOUT_MS = 5000;
  const CHART_WINDOW_MS = 120_000;
  // Devices sample at about 10 Hz; a longer silence is drawn as a break in the line
  // rather than a straight segment that would suggest readings that were never taken.
  const GAP_MS = 2000;
  // Follow-up requests in one tick while the server says it left samples out of an answer.
  const MAX_TELEMETRY_PAGES = 20;
  // Checking a password is deliberately slow on the server.
  const LOGIN_TIMEOUT_MS = 15_000;
  const PRIORITY_RANK = { HIGH: 3, MEDIUM: 2, LOW: 1 };
  const LOCALE = 'en-GB';
  const ROLE_LABEL = { ops: 'Operations', 'site-it': 'Site IT', pharmacist: 'Pharmacist', qa: 'QA', auditor: 'Auditor' };
  // Who may do what on the enrollment page; the server enforces the same table.
  const ENROLL_CREATE_ROLES = new Set(['ops', 'site-it']);
  const ENROLL_LIST_ROLES = new Set(['ops', 'site-it', 'auditor']);
  // ListRecipes, GetRecipe and ListRecipeDeliveries in the server's access table.
  const RECIPE_ROLES = new Set(['ops', 'pharmacist', 'qa', 'auditor']);
  // ListBatches and GetBatch in the server's access table.
  const BATCH_ROLES = RECIPE_ROLES;
  // ReleaseBatch in the server's access table.
  const BATCH_SIGN_ROLES = new Set(['qa']);
  const BATCH_COLUMNS = ['Batch', 'Device', 'Recipe', 'Started', 'Outcome', 'QC', 'Disposition', 'Started by'];
  const QC_LABEL = {
    QUALITY_ATTRIBUTE_SIZE_NM: 'Size (Z-average)', QUALITY_ATTRIBUTE_PDI: 'Polydispersity (PDI)',
    QUALITY_ATTRIBUTE_ENCAPSULATION_PCT: 'Encapsulation', QUALITY_ATTRIBUTE_PH: 'pH', QUALITY_ATTRIBUTE_YIELD_PCT: 'Yield',
  };
  const DISPOSITIONS = [
    ['awaiting_release', 'Awaiting release'], ['released', 'Released'], ['rejected', 'Rejected'], ['failed', 'Failed'],
  ];

  // === DOM helpers ===

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v == null || v === false) continue;
        if (k === 'class') el.className = v;
        else if (k === 'text') el.textContent = v;
        else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
        else el.setAttribute(k, v === true ? '' : String(v));
      }
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c == null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function setText(el, text) {
    const s = text == null ? '' : String(text);
    if (el.textContent !== s) el.textContent = s;
  }

  function setAttr(el, name, value) {
    if (value == null) {
      if (el.hasAttribute(name)) el.removeAttribute(name);
      return;
    }
    const s = String(value);
    if (el.getAttribute(name) !== s) el.setAttribute(name, s);
  }

  function setClass(el, cls) {
    if (el.className !== cls) el.className = cls;
  }

  /** Replaces the children of `el` only when their rendered text would change. */
  function setChildren(el, signature, build) {
    if (el.dataset.sig === signature) return;
    el.dataset.sig = signature;
    el.replaceChildren();
    append(el, [build()]);
  }

  /**
   * Keyed list update: keeps the element of every item whose key is still present, creates
   * the missing ones, drops the rest and puts them in the order of `items`.
   */
  function reconcile(container, items, keyOf, create, update) {
    const existing = new Map();
    for (const el of Array.from(container.children)) {
      if (el.dataset.key == null) el.remove();
      else existing.set(el.dataset.key, el);
    }
    let prev = null;
    for (const item of items) {
      const key = String(keyOf(item));
      let el = existing.get(key);
      if (el) existing.delete(key);
      else {
        el = create(item);
        el.dataset.key = key;
      }
      update(el, item);
      const want = prev ? prev.nextSibling : container.firstChild;
      if (el !== want) container.insertBefore(el, want);
      prev = el;
    }
    for (const el of existing.values()) el.remove();
  }

  // === Formatting ===

  function fmtNum(v, digits = 0) {
    if (typeof v !== 'number' || !Number.isFinite(v)) return '—';
    // Sensor noise around zero would otherwise print as "-0.0".
    const rounded = Number(v.toFixed(digits)) || 0;
    return rounded.toLocaleString(LOCALE, { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  function fmtDuration(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min`;
    const hr = Math.floor(m / 60);
    if (hr < 48) return `${hr} h ${m % 60} min`;
    return `${Math.floor(hr / 24)} d`;
  }

  function fmtAgo(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms) || ms <= 0) return 'never';
    return `${fmtDuration(serverNow() - ms)} ago`;
  }

  function fmtClock(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms) || ms <= 0) return '—';
    return new Date(ms).toLocaleTimeString(LOCALE, { hour12: false });
  }

  function fmtDateTime(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms) || ms <= 0) return '—';
    const d = new Date(ms);
    const sameDay = d.toDateString() === new Date(serverNow()).toDateString();
    return sameDay
      ? d.toLocaleTimeString(LOCALE, { hour12: false })
      : d.toLocaleString(LOCALE, { hour12: false, day: '2-digit', month: 'short', hour: '2-digit', minute: '2-digit', second: '2-digit' });
  }

  function hasTime(ms) {
    return typeof ms === 'number' && Number.isFinite(ms) && ms > 0;
  }

  function known(value) {
    return value && value !== 'UNSPECIFIED' ? String(value) : null;
  }

  function phaseLabel(phase) {
    return known(phase) ? phase.replace(/_/g, ' ') : '—';
  }

  function phaseClass(phase) {
    return known(phase) ? `phase phase-${phase.toLowerCase()}` : 'phase phase-none';
  }

  /** "aqueous line", or null for an alarm that concerns the whole device. */
  function lineText(alarm) {
    return known(alarm.line) ? `${alarm.line.toLowerCase()} line` : null;
  }

  /**
   * The flow-rate ratio, only while both lines are commanded to flow: between runs the
   * flows are sensor noise around zero and their ratio means nothing.
   */
  function frrOf(s) {
    if (!s || typeof s.frr !== 'number' || !Number.isFinite(s.frr)) return null;
    const aq = s.aqueous && s.aqueous.flow_setpoint_ul_min;
    const et = s.ethanol && s.ethanol.flow_setpoint_ul_min;
    return aq > 0 && et > 0 ? s.frr : null;
  }

  function ulToMl(v) {
    return typeof v === 'number' && Number.isFinite(v) ? v / 1000 : null;
  }

  // === Device helpers ===

  function worstPriority(alarms) {
    let worst = null;
    for (const a of alarms || []) {
      const rank = PRIORITY_RANK[a.priority] || 0;
      if (worst == null || rank > (PRIORITY_RANK[worst] || 0)) worst = a.priority || 'UNSPECIFIED';
    }
    return worst;
  }

  function sortedAlarms(alarms) {
    return [...(alarms || [])].sort(
      (a, b) => (PRIORITY_RANK[b.priority] || 0) - (PRIORITY_RANK[a.priority] || 0) || (b.changed_ms || 0) - (a.changed_ms || 0),
    );
  }

  function byId(a, b) {
    return String(a.id).localeCompare(String(b.id), LOCALE, { numeric: true });
  }

  function siteName(id) {
    const site = state.sites.get(id);
    return site ? site.name : id || '—';
  }

  function alarmBadge(alarms) {
    const list = alarms || [];
    const worst = worstPriority(list);
    if (!worst) return null;
    const short = { HIGH: 'HIGH', MEDIUM: 'MED', LOW: 'LOW' }[worst] || 'ALARM';
    const text = list.length === 1 ? short : `${short} +${list.length - 1}`;
    return h('span', {
      class: `alarm-badge prio-${worst}`,
      'data-testid': 'alarm-badge',
      title: sortedAlarms(list).map((a) => `${a.priority} ${a.code}: ${a.detail || ''}`).join('\n'),
    }, text);
  }

  function alarmSignature(alarms) {
    return (alarms || []).map((a) => `${a.priority}|${a.code}|${a.line}|${a.detail}|${a.changed_ms}`).join(';');
  }

  // === Server access ===

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  class UnreachableError extends Error {}

  function isSignedOutError(err) {
    return err instanceof HttpError && err.status === 401;
  }

  // Offset between the server's clock and this browser's, so "last seen N s ago" stays
  // right on a workstation whose clock is off. The Date header has one-second resolution,
  // so offsets below a few seconds are treated as noise.
  let clockOffset = 0;

  function serverNow() {
    return Date.now() + clockOffset;
  }

  function noteServerClock(res) {
    const header = res.headers.get('Date');
    if (!header) return;
    const server = Date.parse(header);
    if (!Number.isFinite(server)) return;
    const offset = server + 500 - Date.now();
    clockOffset = Math.abs(offset) > 3000 ? offset : 0;
  }

  /** JSON request to the server; `body`, when given, is sent as JSON. 204 resolves to null. */
  async function api(path, { method = 'GET', body, timeoutMs = REQUEST_TIMEOUT_MS } = {}) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), timeoutMs);
    const init = { method, signal: ctl.signal, cache: 'no-store', credentials: 'same-origin', headers: { Accept: 'application/json' } };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    try {
      let res;
      try {
        res = await fetch(path, init);
      } catch (e) {
        throw new UnreachableError(ctl.signal.aborted ? 'request timed out' : 'connection failed');
      }
      noteServerClock(res);
      if (res.status === 204) return null;
      let answer = null;
      try {
        answer = await res.json();
      } catch (e) {
        if (ctl.signal.aborted) throw new UnreachableError('request timed out');
      }
      if (!res.ok) throw new HttpError(res.status, (answer && answer.error) || `HTTP ${res.status}`);
      if (answer == null) throw new HttpError(res.status, 'the server sent a response that is not JSON');
      return answer;
    } finally {
      clearTimeout(timer);
    }
  }

  // === App state, polling and routing ===

  const state = {
    view: null,
    route: null,
    // Bumped on every navigation and filter change: answers to older requests are dropped.
    gen: 0,
    sites: new Map(),
    lastOk: 0,
    timer: null,
    // The signed-in person ({id, display_name, role, site_id}); null until /api/me answers.
    me: null,
    // True while the sign-in form is up; nothing polls then.
    signedOut: false,
    // Whose data the mounted view shows: signing in as someone else rebuilds it.
    shownFor: null,
  };

  const SESSION_ENDED = 'Your session has ended. Sign in again to continue where you were.';

  function rememberSites(fleet) {
    if (!fleet || !Array.isArray(fleet.sites)) return;
    state.sites = new Map(fleet.sites.map((s) => [s.id, s]));
    renderSession();
  }

  const el = {
    view: null,
    banner: null,
    bannerTitle: null,
    bannerDetail: null,
    live: null,
    liveText: null,
    nav: null,
    enrollNav: null,
    recipesNav: null,
    batchesNav: null,
    session: null,
    whoami: null,
    whoamiName: null,
    whoamiRole: null,
    logout: null,
    login: null,
    loginNote: null,
    loginForm: null,
    loginUser: null,
    loginPassword: null,
    loginError: null,
    loginSubmit: null,
  };

  /** "Text." from a server message that may or may not end in a full stop. */
  function sentence(text) {
    const s = String(text || '').trim();
    return /[.!?…]$/.test(s) ? s : `${s}.`;
  }

  function markOk() {
    state.lastOk = Date.now();
    el.banner.hidden = true;
    el.view.classList.remove('stale');
    setAttr(el.live, 'data-state', 'live');
    setText(el.liveText, `Live · ${fmtClock(serverNow())}`);
  }

  function markFailure(err) {
    let title;
    let why;
    if (err instanceof UnreachableError) {
      title = 'Server unreachable, retrying…';
      why = err.message === 'request timed out' ? 'The last request timed out.' : 'The connection failed.';
    } else if (err instanceof HttpError && err.status >= 500) {
      title = 'Server error, retrying…';
      why = `The server answered ${err.status}: ${err.message}.`;
    } else if (err instanceof HttpError && err.status === 403) {
      title = 'Not permitted for your role';
      why = sentence(err.message);
    } else {
      // A 4xx or a payload this page cannot read: the server is up but something is off.
      console.error(err);
      title = 'Unexpected answer from the server, retrying…';
      why = err instanceof HttpError ? `HTTP ${err.status}: ${err.message}.` : String(err && err.message ? err.message : err);
    }
    el.view.hidden = false;
    el.banner.hidden = false;
    setText(el.bannerTitle, title);
    el.view.classList.toggle('stale', state.lastOk > 0);
    const since = state.lastOk ? ` Showing data from ${fmtClock(state.lastOk + clockOffset)}.` : '';
    setText(el.bannerDetail, `${why}${since}`);
    setAttr(el.live, 'data-state', 'error');
    const what = err instanceof UnreachableError ? 'Disconnected' : 'Not updating';
    setText(el.liveText, state.lastOk ? `${what} · last update ${fmtClock(state.lastOk + clockOffset)}` : what);
  }

  async function tick() {
    clearTimeout(state.timer);
    if (state.signedOut) return;
    const gen = state.gen;
    const view = state.view;
    const started = Date.now();
    const isCurrent = () => gen === state.gen && view === state.view && !state.signedOut;
    try {
      if (!state.me) {
        const me = await api('api/me');
        if (!isCurrent()) return;
        setMe(me);
        el.view.hidden = false;
      }
      await view.refresh(isCurrent);
      if (isCurrent()) {
        markOk();
        state.shownFor = state.me.id;
      }
    } catch (err) {
      if (!isCurrent()) return;
      if (isSignedOutError(err)) showLogin(state.shownFor ? SESSION_ENDED : null);
      else markFailure(err);
    } finally {
      if (isCurrent()) {
        const wait = Math.max(200, POLL_MS - (Date.now() - started));
        state.timer = setTimeout(tick, wait);
      }
    }
  }

  function refreshNow() {
    state.gen += 1;
    tick();
  }

  function parseRoute() {
    const raw = location.hash.replace(/^#/, '') || '/';
    const q = raw.indexOf('?');
    const path = q >= 0 ? raw.slice(0, q) : raw;
    const params = new URLSearchParams(q >= 0 ? raw.slice(q + 1) : '');
    let parts;
    try {
      parts = path.split('/').filter(Boolean).map(decodeURIComponent);
    } catch (e) {
      return { name: 'unknown', path };
    }
    if (parts.length === 0) return { name: 'overview' };
    if (parts[0] === 'devices' && parts.length === 1) return { name: 'devices', site: params.get('site') || '' };
    if (parts[0] === 'devices' && parts.length === 2) return { name: 'device', id: parts[1] };
    if (parts[0] === 'enroll' && parts.length === 1) return { name: 'enroll' };
    if (parts[0] === 'batches' && parts.length <= 2) return { name: 'batches', id: parts[1] || '' };
    if (parts[0] === 'recipes' && parts.length <= 3) {
      const version = parts.length === 3 ? Number(parts[2]) : 0;
      if (!Number.isSafeInteger(version) || version < 0) return { name: 'unknown', path };
      return { name: 'recipes', id: parts[1] || '', version };
    }
    return { name: 'unknown', path };
  }

  function onRoute() {
    const route = parseRoute();
    const prev = state.route;
    state.route = route;
    for (const a of document.querySelectorAll('.mainnav a')) {
      const nav = a.dataset.nav;
      a.classList.toggle('active', nav === route.name || (nav === 'devices' && route.name === 'device'));
    }
    if (prev && prev.name === 'devices' && route.name === 'devices' && state.view && state.view.setSite) {
      state.view.setSite(route.site);
      refreshNow();
      return;
    }
    // Selecting another version keeps the list (and its filter) where it is.
    if (prev && prev.name === 'batches' && route.name === 'batches' && state.view && state.view.select) {
      state.view.select(route.id);
      refreshNow();
      return;
    }
    if (prev && prev.name === 'recipes' && route.name === 'recipes' && state.view && state.view.select) {
      state.view.select(route.id, route.version);
      refreshNow();
      return;
    }
    if (state.view && state.view.unmount) state.view.unmount();
    const make = {
      overview: overviewView, devices: devicesView, device: deviceView, enroll: enrollView, recipes: recipesView,
      batches: batchesView,
    }[route.name] || unknownView;
    state.view = make(route);
    el.view.replaceChildren(state.view.root);
    window.scrollTo(0, 0);
    if (!state.signedOut) document.title = state.view.title || 'Nanofleet';
    refreshNow();
  }

  /** Builds the view of the current address afresh, whatever was mounted before. */
  function remount() {
    state.route = null;
    onRoute();
  }

  function navigate(hash) {
    if (location.hash === hash) onRoute();
    else location.hash = hash;
  }

  function deviceHash(id) {
    return `#/devices/${encodeURIComponent(id)}`;
  }

  // === Session ===

  function can(roles) {
    return state.me != null && roles.has(state.me.role);
  }

  function setMe(person) {
    state.me = person || null;
    renderSession();
  }

  function renderSession() {
    const me = state.me;
    el.session.hidden = me == null;
    el.nav.hidden = state.signedOut;
    el.enrollNav.hidden = !can(ENROLL_CREATE_ROLES);
    el.recipesNav.hidden = !can(RECIPE_ROLES);
    el.batchesNav.hidden = !can(BATCH_ROLES);
    if (!me) return;
    setAttr(el.whoami, 'data-person-id', me.id);
    setAttr(el.whoami, 'data-role', me.role);
    setAttr(el.whoami, 'data-site-id', me.site_id || null);
    setText(el.whoamiName, me.display_name || me.id);
    setText(el.whoamiRole, `${ROLE_LABEL[me.role] || me.role} · ${me.site_id ? siteName(me.site_id) : 'all sites'}`);
    setAttr(el.whoami, 'title', `Signed in as ${me.id}, role ${me.role}${me.site_id ? `, site ${me.site_id}` : ''}`);
  }

  /** Puts the sign-in form in place of the view and stops polling until someone signs in. */
  function showLogin(note) {
    clearTimeout(state.timer);
    state.gen += 1;
    setText(el.loginNote, note || 'Use your Nanofleet user id and password.');
    if (state.signedOut) return;
    state.signedOut = true;
    setMe(null);
    el.view.hidden = true;
    el.banner.hidden = true;
    el.login.hidden = false;
    showLoginError(null);
    setAttr(el.live, 'data-state', 'signed-out');
    setText(el.liveText, 'Signed out');
    document.title = 'Sign in · Nanofleet';
    (el.loginUser.value ? el.loginPassword : el.loginUser).focus();
  }

  function showLoginError(message) {
    el.loginError.hidden = !message;
    setText(el.loginError, message || '');
    setAttr(el.loginPassword, 'aria-invalid', message ? 'true' : null);
  }

  async function submitLogin(ev) {
    ev.preventDefault();
    const user = el.loginUser.value.trim();
    const password = el.loginPassword.value;
    if (!user || !password) {
      showLoginError('Enter your user id and password.');
      return;
    }
    el.loginSubmit.disabled = true;
    setText(el.loginSubmit, 'Signing in…');
    try {
      const res = await api('api/login', { method: 'POST', body: { user, password }, timeoutMs: LOGIN_TIMEOUT_MS });
      if (!res || !res.person || !res.person.id) throw new HttpError(200, 'the server accepted the sign-in but did not say who signed in');
      el.loginPassword.value = '';
      signedIn(res.person);
    } catch (err) {
      // The server's own words: wrong credentials and lock-outs are explained there.
      if (err instanceof UnreachableError) showLoginError(`Server unreachable (${err.message}). Try again.`);
      else showLoginError(sentence(err.message));
      el.loginPassword.select();
      el.loginPassword.focus();
    } finally {
      el.loginSubmit.disabled = false;
      setText(el.loginSubmit, 'Sign in');
    }
  }

  function signedIn(person) {
    state.signedOut = false;
    el.login.hidden = true;
    showLoginError(null);
    setAttr(el.live, 'data-state', 'connecting');
    setText(el.liveText, 'Connecting…');
    if (state.shownFor === person.id) {
      setMe(person);
      el.view.hidden = false;
      document.title = state.view.title || 'Nanofleet';
      refreshNow();
      return;
    }
    // Someone else's data must not stay on screen, not even until the first refresh.
    state.sites = new Map();
    state.lastOk = 0;
    state.shownFor = null;
    setMe(person);
    el.view.hidden = false;
    remount();
  }

  async function signOut() {
    el.logout.disabled = true;
    try {
      await api('api/logout', { method: 'POST' });
    } catch (err) {
      // 401: the session was over already, which is what was asked for.
      if (!isSignedOutError(err)) {
        markFailure(err);
        return;
      }
    } finally {
      el.logout.disabled = false;
    }
    if (state.view && state.view.unmount) state.view.unmount();
    state.view = null;
    el.view.replaceChildren();
    state.shownFor = null;
    state.sites = new Map();
    state.lastOk = 0;
    el.loginUser.value = '';
    el.loginPassword.value = '';
    showLogin('You have signed out.');
  }

  // === Overview ===

  function kpi(label, testid) {
    const value = h('div', { class: 'kpi-value', 'data-testid': testid }, '—');
    const sub = h('div', { class: 'kpi-sub' });
    const card = h('div', { class: 'card kpi' }, h('div', { class: 'kpi-label' }, label), value, sub);
    return { card, value, sub };
  }

  function overviewView() {
    const k = {
      total: kpi('Devices', 'fleet-total'),
      online: kpi('Online', 'fleet-online'),
      alarms: kpi('Active alarms', 'fleet-alarms'),
      accepted: kpi('Messages accepted', 'ingest-accepted'),
      duplicates: kpi('Duplicates', 'ingest-duplicates'),
      rejected: kpi('Rejected', 'ingest-rejected'),
    };
    const siteGrid = h('div', { class: 'site-grid' });
    const siteMeta = h('span', { class: 'muted' });
    const alarmBody = h('tbody');
    const alarmMeta = h('span', { class: 'muted' });

    const root = h('div', { class: 'overview' },
      h('div', { class: 'page-title' }, h('h1', null, 'Fleet overview'), h('span', { class: 'muted' }, 'Formulation devices across hospital pharmacies')),
      h('section', { class: 'kpis' }, Object.values(k).map((x) => x.card)),
      h('section', { class: 'section' },
        h('div', { class: 'section-head' }, h('h2', null, 'Sites'), siteMeta),
        siteGrid),
      h('section', { class: 'section' },
        h('div', { class: 'section-head' }, h('h2', null, 'Active alarms'), alarmMeta),
        h('div', { class: 'card table-wrap' },
          h('table', { class: 'grid', 'data-testid': 'alarm-table' },
            h('thead', null, h('tr', null,
              h('th', null, 'Priority'), h('th', null, 'Device'), h('th', null, 'Site'), h('th', null, 'Alarm'),
              h('th', null, 'Line'), h('th', null, 'Detail'), h('th', null, 'Since'))),
            alarmBody))));

    function renderTotals(fleet, devices) {
      const total = fleet.devices_total ?? 0;
      const online = fleet.devices_online ?? 0;
      setText(k.total.value, fmtNum(total));
      setText(k.total.sub, `${fmtNum((fleet.sites || []).length)} sites`);
      setText(k.online.value, fmtNum(online));
      setText(k.online.sub, total > 0 ? `${fmtNum((100 * online) / total)} % of fleet · ${fmtNum(total - online)} offline` : 'no devices registered');
      setClass(k.online.card, `card kpi ${total > 0 && online === total ? 'good' : online < total ? 'warn' : ''}`);

      const all = devices.flatMap((d) => d.active_alarms || []);
      const high = all.filter((a) => a.priority === 'HIGH').length;
      const withAlarms = devices.filter((d) => (d.active_alarms || []).length > 0).length;
      setText(k.alarms.value, fmtNum(all.length));
      setText(k.alarms.sub, all.length ? `${fmtNum(high)} high · on ${fmtNum(withAlarms)} device${withAlarms === 1 ? '' : 's'}` : 'none');
      setClass(k.alarms.card, `card kpi ${high ? 'bad' : all.length ? 'warn' : 'good'}`);

      const ingest = fleet.ingest || {};
      const rejected = ingest.rejected || {};
      const reasons = Object.entries(rejected).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
      const rejectedTotal = reasons.reduce((s, [, n]) => s + n, 0);
      setText(k.accepted.value, fmtNum(ingest.accepted));
      setText(k.accepted.sub, ingest.batches_committed != null ? `${fmtNum(ingest.batches_committed)} batches committed` : '');
      setText(k.duplicates.value, fmtNum(ingest.duplicates));
      setText(k.duplicates.sub, 'resent messages, stored once');
      setText(k.rejected.value, fmtNum(rejectedTotal));
      const reasonText = reasons.map(([r, n]) => `${r.replace(/_/g, ' ')} ${fmtNum(n)}`).join(' · ');
      const storage = ingest.storage_errors ? ` · storage errors ${fmtNum(ingest.storage_errors)}` : '';
      setText(k.rejected.sub, (reasonText || 'none') + storage);
      setAttr(k.rejected.sub, 'title', reasonText || null);
      setClass(k.rejected.card, `card kpi ${rejectedTotal ? 'warn' : ''}`);
    }

    function renderSites(fleet, devices) {
      const groups = new Map();
      for (const s of fleet.sites || []) groups.set(s.id, { site: s, devices: [] });
      for (const d of devices) {
        if (!groups.has(d.site_id)) {
          groups.set(d.site_id, { site: { id: d.site_id, name: d.site_id || 'No site', devices_total: null, devices_online: null }, devices: [] });
        }
        groups.get(d.site_id).devices.push(d);
      }
      const list = [...groups.values()];
      setText(siteMeta, `${list.length} hospital pharmac${list.length === 1 ? 'y' : 'ies'}`);
      reconcile(siteGrid, list, (g) => g.site.id, createSiteCard, updateSiteCard);
    }

    function createSiteCard(g) {
      const name = h('div', { class: 'site-name' });
      const id = h('div', { class: 'site-id' });
      const count = h('span', { class: 'site-count' });
      const tiles = h('div', { class: 'tile-grid' });
      const card = h('article', { class: 'card site-card', 'data-testid': 'site-card', 'data-site-id': g.site.id },
        h('div', { class: 'card-head' }, h('div', null, name, id), count),
        tiles);
      card._parts = { name, id, count, tiles };
      return card;
    }

    function updateSiteCard(card, g) {
      const p = card._parts;
      setText(p.name, g.site.name || g.site.id);
      setText(p.id, g.site.id);
      const total = g.site.devices_total ?? g.devices.length;
      const online = g.site.devices_online ?? g.devices.filter((d) => d.online).length;
      setText(p.count, `${fmtNum(online)} / ${fmtNum(total)} online`);
      setClass(p.count, `site-count ${online === total && total > 0 ? '' : online === 0 ? 'none' : 'partial'}`);
      reconcile(p.tiles, [...g.devices].sort(byId), (d) => d.id, createTile, updateTile);
      if (g.devices.length === 0 && !p.tiles.firstChild) {
        p.tiles.append(h('div', { class: 'muted' }, 'No devices registered at this site.'));
      }
    }

    function createTile(d) {
      const dot = h('span', { class: 'dot' });
      const id = h('span', { class: 'tile-id' }, d.id);
      const badge = h('span', { class: 'badge-slot' });
      const phase = h('span', { class: 'phase' });
      const meta = h('div', { class: 'tile-meta' });
      const tile = h('a', { class: 'tile', href: deviceHash(d.id), 'data-testid': 'device-tile', 'data-device-id': d.id },
        h('div', { class: 'tile-top' }, dot, id, badge),
        h('div', { class: 'tile-phase' }, phase),
        meta);
      tile._parts = { dot, badge, phase, meta };
      return tile;
    }

    function updateTile(tile, d) {
      const p = tile._parts;
      const s = d.last_sample;
      const worst = worstPriority(d.active_alarms);
      setAttr(tile, 'data-online', d.online ? 'true' : 'false');
      setAttr(tile, 'data-alarm', worst);
      setClass(p.dot, d.online ? 'dot on' : 'dot');
      setChildren(p.badge, alarmSignature(d.active_alarms), () => alarmBadge(d.active_alarms));
      setText(p.phase, phaseLabel(s && s.phase));
      setClass(p.phase, phaseClass(s && s.phase));
      const meta = d.online
        ? (s && typeof s.tfr_ml_min === 'number' ? `TFR ${fmtNum(s.tfr_ml_min, 1)} mL/min · FRR ${fmtNum(frrOf(s), 1)}` : `${d.model || ''} · ${d.firmware_version || ''}`)
        : `offline · seen ${fmtAgo(d.last_seen_ms)}`;
      setText(p.meta, meta);
      setAttr(tile, 'title', `${d.id} · ${d.online ? 'online' : 'offline'} · ${d.model || ''} firmware ${d.firmware_version || '?'}`);
    }

    function renderAlarms(devices) {
      const rows = [];
      for (const d of devices) for (const a of d.active_alarms || []) rows.push({ d, a });
      rows.sort((x, y) => (PRIORITY_RANK[y.a.priority] || 0) - (PRIORITY_RANK[x.a.priority] || 0) || (y.a.changed_ms || 0) - (x.a.changed_ms || 0));
      setText(alarmMeta, rows.length ? `${rows.length} across the fleet, most severe first` : '');
      if (rows.length === 0) {
        setChildren(alarmBody, 'empty', () => h('tr', null, h('td', { class: 'empty', colspan: 7 }, 'No active alarms across the fleet.')));
        return;
      }
      delete alarmBody.dataset.sig;
      reconcile(alarmBody, rows, (r) => `${r.d.id}|${r.a.code}|${r.a.line || ''}`, createAlarmRow, updateAlarmRow);
    }

    function createAlarmRow(r) {
      const cells = Array.from({ length: 7 }, (_, i) => h('td', { class: i === 5 ? 'wrap' : null }));
      const row = h('tr', { class: 'link', 'data-testid': 'alarm-row', onclick: () => navigate(deviceHash(r.d.id)) }, cells);
      row._cells = cells;
      return row;
    }

    function updateAlarmRow(row, r) {
      const [prio, dev, site, code, line, detail, since] = row._cells;
      setChildren(prio, r.a.priority, () => h('span', { class: `alarm-badge prio-${r.a.priority}` }, r.a.priority));
      setChildren(dev, r.d.id, () => h('a', { class: 'id-link', href: deviceHash(r.d.id) }, r.d.id));
      setText(site, siteName(r.d.site_id));
      setText(code, r.a.code);
      setClass(code, 'mono');
      setText(line, known(r.a.line) ? r.a.line.toLowerCase() : '—');
      setText(detail, r.a.detail || '');
      setText(since, hasTime(r.a.changed_ms) ? `${fmtDateTime(r.a.changed_ms)} (${fmtAgo(r.a.changed_ms)})` : '—');
      setClass(since, 'muted');
    }

    return {
      root,
      title: 'Fleet overview · Nanofleet',
      async refresh(isCurrent) {
        const [fleet, devs] = await Promise.all([api('api/fleet'), api('api/devices')]);
        if (!isCurrent()) return;
        rememberSites(fleet);
        const devices = (devs.devices || []).slice().sort(byId);
        renderTotals(fleet, devices);
        renderSites(fleet, devices);
        renderAlarms(devices);
      },
    };
  }

  // === Device table ===

  const DEVICE_COLUMNS = [
    ['Device'], ['Site'], ['Model'], ['Firmware'], ['Presence'], ['Phase'],
    ['TFR', 'mL/min', true], ['FRR', 'aq:eth', true], ['P aqueous', 'mbar', true], ['P ethanol', 'mbar', true],
    ['Alarms'],
  ];

  function devicesView(route) {
    let site = route.site || '';
    const select = h('select', {
      id: 'site-filter',
      'data-testid': 'site-filter',
      onchange: () => navigate(select.value ? `#/devices?site=${encodeURIComponent(select.value)}` : '#/devices'),
    });
    const count = h('span', { class: 'count', 'data-testid': 'device-count' });
    const tbody = h('tbody');

    const root = h('div', { class: 'devices' },
      h('div', { class: 'page-title' }, h('h1', null, 'Devices'), h('span', { class: 'muted' }, 'Presence, process values and alarms, refreshed every second')),
      h('div', { class: 'toolbar' }, h('label', { for: 'site-filter' }, 'Site'), select, count),
      h('div', { class: 'card table-wrap' },
        h('table', { class: 'grid', 'data-testid': 'device-table' },
          h('thead', null, h('tr', null, DEVICE_COLUMNS.map(([name, unit, num]) =>
            h('th', { class: num ? 'num' : null }, name, unit ? h('span', { class: 'unit' }, ` ${unit}`) : null)))),
          tbody)));

    function renderOptions() {
      const options = [{ id: '', name: 'All sites' }, ...[...state.sites.values()].sort((a, b) => a.name.localeCompare(b.name, LOCALE))];
      if (site && !state.sites.has(site)) options.push({ id: site, name: site });
      reconcile(select, options, (o) => o.id || '*', (o) => h('option', { value: o.id }), (opt, o) => setText(opt, o.name));
      if (select.value !== site) select.value = site;
    }

    function createRow(d) {
      const cells = DEVICE_COLUMNS.map(([name, , num]) => h('td', { class: num ? 'num' : { Alarms: 'wrap', Site: 'site' }[name] || null }));
      const row = h('tr', { class: 'link', 'data-testid': 'device-row', 'data-device-id': d.id }, cells);
      row.addEventListener('click', (ev) => {
        if (ev.target.closest('a')) return;
        navigate(deviceHash(d.id));
      });
      row._cells = cells;
      return row;
    }

    function updateRow(row, d) {
      const [id, siteCell, model, fw, presence, phase, tfr, frr, paq, peth, alarms] = row._cells;
      const s = d.last_sample;
      const worst = worstPriority(d.active_alarms);
      setAttr(row, 'data-site-id', d.site_id);
      setAttr(row, 'data-online', d.online ? 'true' : 'false');
      setClass(row, `link${d.online ? '' : ' offline'}${worst ? ` alarm-${worst.toLowerCase()}` : ''}`);
      setChildren(id, d.id, () => h('a', { class: 'id-link', href: deviceHash(d.id) }, d.id));
      setText(siteCell, siteName(d.site_id));
      setText(model, d.model || '—');
      setText(fw, d.firmware_version || '—');
      setChildren(presence, `${d.online}`, () => h('span', { class: `presence ${d.online ? 'on' : 'off'}` },
        h('span', { class: d.online ? 'dot on' : 'dot' }),
        h('span', { class: 'presence-state' }, d.online ? 'Online' : 'Offline'),
        h('span', { class: 'presence-ago' })));
      setText(presence.querySelector('.presence-ago'), `last seen ${fmtAgo(d.last_seen_ms)}`);
      const ph = s ? s.phase : null;
      setChildren(phase, String(ph), () => h('span', { class: phaseClass(ph) }, phaseLabel(ph)));
      setText(tfr, fmtNum(s && s.tfr_ml_min, 2));
      setText(frr, fmtNum(frrOf(s), 2));
      setText(paq, fmtNum(s && s.aqueous && s.aqueous.pressure_mbar, 0));
      setText(peth, fmtNum(s && s.ethanol && s.ethanol.pressure_mbar, 0));
      setChildren(alarms, alarmSignature(d.active_alarms), () => {
        const list = sortedAlarms(d.active_alarms);
        if (list.length === 0) return h('span', { class: 'muted' }, '—');
        return h('span', { class: 'alarm-chips' }, list.map((a) =>
          h('span', { class: `alarm-badge prio-${a.priority}`, title: `${a.priority}${lineText(a) ? ` · ${lineText(a)}` : ''}: ${a.detail || ''}` }, a.code)));
      });
    }

    return {
      root,
      title: 'Devices · Nanofleet',
      setSite(next) {
        site = next || '';
        renderOptions();
      },
      async refresh(isCurrent) {
        const query = site ? `?site=${encodeURIComponent(site)}` : '';
        const [fleet, devs] = await Promise.all([api('api/fleet'), api(`api/devices${query}`)]);
        if (!isCurrent()) return;
        rememberSites(fleet);
        renderOptions();
        const devices = (devs.devices || []).slice().sort((a, b) =>
          siteName(a.site_id).localeCompare(siteName(b.site_id), LOCALE) || byId(a, b));
        const online = devices.filter((d) => d.online).length;
        setText(count, `${devices.length} device${devices.length === 1 ? '' : 's'} · ${online} online`);
        if (devices.length === 0) {
          setChildren(tbody, 'empty', () => h('tr', null, h('td', { class: 'empty', colspan: DEVICE_COLUMNS.length },
            site ? 'No devices registered at this site.' : 'No devices registered.')));
          return;
        }
        delete tbody.dataset.sig;
        reconcile(tbody, devices, (d) => d.id, createRow, updateRow);
      },
    };
  }

  // === Device page ===

  function reading(label) {
    const value = h('dd');
    return { node: h('div', null, h('dt', null, label), value), value };
  }

  function setReading(r, value, unit) {
    setChildren(r.value, `${value}|${unit || ''}`, () => [value, unit ? h('span', { class: 'unit' }, unit) : null]);
  }

  const LINE_ROWS = [
    ['flow', 'Flow', 'mL/min'],
    ['setpoint', 'Flow setpoint', 'mL/min'],
    ['deviation', 'Deviation from setpoint', null],
    ['pressure', 'Pressure', 'mbar'],
    ['temperature', 'Fluid temperature', '°C'],
    ['air', 'Air in line', null],
  ];

  function deviceView(route) {
    const deviceId = route.id;
    const telemetry = { samples: [], lastTime: null, loaded: false };

    const presence = h('span', { class: 'presence' });
    const facts = {};
    const factList = h('dl', { class: 'facts' },
      [['model', 'Model'], ['firmware', 'Firmware'], ['site', 'Site'], ['connected', 'Connected since'], ['seen', 'Last seen'], ['seq', 'Telemetry seq']]
        .map(([key, label]) => {
          facts[key] = h('dd', null, '—');
          return h('div', null, h('dt', null, label), facts[key]);
        }));

    const r = {
      phase: reading('Phase'), run: reading('Run'),
      tfr: reading('Total flow rate (TFR)'), frr: reading('Flow-rate ratio (FRR)'),
      dp: reading('Mixer pressure drop'), door: reading('Door'),
      chamber: reading('Chamber temperature'), cartridge: reading('Cartridge temperature'),
    };
    const sampleTime = h('span', { class: 'muted' });
    const lineCells = {};
    const lineBody = h('tbody', null, LINE_ROWS.map(([key, label, unit]) => {
      lineCells[key] = { aqueous: h('td', { class: 'num' }), ethanol: h('td', { class: 'num' }) };
      return h('tr', { 'data-quantity': key },
        h('td', null, label, unit ? h('span', { class: 'unit' }, ` ${unit}`) : null),
        lineCells[key].aqueous, lineCells[key].ethanol);
    }));
    const alarmList = h('div');
    const alarmCount = h('span', { class: 'muted' });

    const canvas = h('canvas', { 'data-testid': 'telemetry-chart', 'data-points': '0', role: 'img', 'aria-label': `Flow and pressure of ${deviceId} over the last two minutes` });
    const chartNote = h('div', { class: 'chart-note' }, 'Waiting for telemetry…');
    const chartMeta = h('span', { class: 'muted' });

    const legend = h('div', { class: 'legend' },
      h('span', { style: 'color: var(--aqueous)' }, h('i'), 'Aqueous'),
      h('span', { style: 'color: var(--ethanol)' }, h('i'), 'Ethanol'),
      h('span', { style: 'color: var(--muted)' }, h('i', { class: 'dashed' }), 'Flow setpoint'),
      h('span', { style: 'color: #7a4fb3' }, h('i'), 'Mixer ΔP'),
      h('span', null, h('i', { class: 'mark' }), 'Air in line'));

    const body = h('div', null,
      h('section', { class: 'card device-head' },
        h('h1', null, deviceId),
        presence,
        factList),
      h('div', { class: 'device-grid' },
        h('section', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', null, 'Process'), sampleTime),
          h('div', { class: 'card-body' }, h('dl', { class: 'readings' }, Object.values(r).map((x) => x.node)))),
        h('section', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', null, 'Fluid lines')),
          h('div', { class: 'table-wrap' }, h('table', { class: 'grid lines', 'data-testid': 'line-table' },
            h('thead', null, h('tr', null,
              h('th', null, ''),
              h('th', { class: 'num' }, h('span', { class: 'line-name' }, h('span', { class: 'swatch aqueous' }), 'Aqueous')),
              h('th', { class: 'num' }, h('span', { class: 'line-name' }, h('span', { class: 'swatch ethanol' }), 'Ethanol')))),
            lineBody))),
        h('section', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', null, 'Active alarms'), alarmCount),
          alarmList)),
      h('section', { class: 'card chart-card' },
        h('div', { class: 'card-head' }, h('h2', null, 'Live telemetry'), chartMeta, legend),
        h('div', { class: 'chart-box' }, canvas, chartNote)));

    const root = h('div', { class: 'device' },
      h('nav', { class: 'crumbs' }, h('a', { href: '#/' }, 'Overview'), h('span', { class: 'sep' }, '›'),
        h('a', { href: '#/devices' }, 'Devices'), h('span', { class: 'sep' }, '›'), h('span', null, deviceId)),
      body);

    function renderNotFound(message) {
      if (root.dataset.missing === message) return;
      root.dataset.missing = message;
      body.replaceChildren(h('section', { class: 'card notice', 'data-testid': 'device-missing' },
        h('h1', null, `Device ${deviceId} not found`),
        h('p', { class: 'muted' }, message),
        h('p', null, h('a', { href: '#/devices' }, 'Back to all devices'))));
    }

    function renderHeader(d) {
      setClass(presence, `presence ${d.online ? 'on' : 'off'}`);
      setAttr(presence, 'data-testid', 'device-presence');
      setAttr(presence, 'data-online', d.online ? 'true' : 'false');
      setChildren(presence, String(d.online), () => [
        h('span', { class: d.online ? 'dot on' : 'dot' }),
        h('span', { class: 'presence-state' }, d.online ? 'Online' : 'Offline'),
        h('span', { class: 'presence-ago' })]);
      setText(presence.querySelector('.presence-ago'), `last seen ${fmtAgo(d.last_seen_ms)}`);
      setText(facts.model, d.model || '—');
      setText(facts.firmware, d.firmware_version || '—');
      setChildren(facts.site, `${d.site_id}|${siteName(d.site_id)}`, () =>
        h('a', { href: `#/devices?site=${encodeURIComponent(d.site_id)}` }, siteName(d.site_id)));
      setText(facts.connected, d.online && d.connected_ms ? `${fmtDateTime(d.connected_ms)} (${fmtDuration(serverNow() - d.connected_ms)})` : '—');
      setText(facts.seen, fmtDateTime(d.last_seen_ms));
      setText(facts.seq, fmtNum(d.telemetry_seq));
    }

    function renderProcess(s) {
      setText(sampleTime, s ? `sample at ${fmtClock(s.time_ms)}` : 'no telemetry yet');
      const ph = s ? s.phase : null;
      setChildren(r.phase.value, String(ph), () => h('span', { class: phaseClass(ph) }, phaseLabel(ph)));
      setReading(r.run, s && s.run_id ? s.run_id : '—');
      setAttr(r.run.value, 'title', s && s.run_id ? s.run_id : null);
      setReading(r.tfr, fmtNum(s && s.tfr_ml_min, 2), 'mL/min');
      setReading(r.frr, frrOf(s) != null ? `${fmtNum(frrOf(s), 2)} : 1` : '—');
      setReading(r.dp, fmtNum(s && s.mixer_pressure_drop_mbar, 0), 'mbar');
      setReading(r.door, s ? (s.door_closed ? 'Closed' : 'Open') : '—');
      setReading(r.chamber, fmtNum(s && s.chamber_temperature_c, 1), '°C');
      setReading(r.cartridge, fmtNum(s && s.cartridge_temperature_c, 1), '°C');

      for (const line of ['aqueous', 'ethanol']) {
        const v = (s && s[line]) || null;
        const cell = (key) => lineCells[key][line];
        setText(cell('flow'), fmtNum(ulToMl(v && v.flow_ul_min), 3));
        setText(cell('setpoint'), fmtNum(ulToMl(v && v.flow_setpoint_ul_min), 3));
        const hasDev = v && Number.isFinite(v.flow_ul_min) && Number.isFinite(v.flow_setpoint_ul_min) && v.flow_setpoint_ul_min > 0;
        const pct = hasDev ? (100 * (v.flow_ul_min - v.flow_setpoint_ul_min)) / v.flow_setpoint_ul_min : null;
        setText(cell('deviation'), pct == null ? '—' : `${pct >= 0 ? '+' : '−'}${fmtNum(Math.abs(pct), 1)} %`);
        // The device raises a flow alarm beyond 5 % off setpoint; flag it before the alarm latches.
        setClass(cell('deviation'), `num${pct != null && Math.abs(pct) > 5 ? ' dev-bad' : ''}`);
        setText(cell('pressure'), fmtNum(v && v.pressure_mbar, 0));
        setText(cell('temperature'), fmtNum(v && v.temperature_c, 1));
        setText(cell('air'), v ? (v.air_in_line ? 'Detected' : 'None') : '—');
        setClass(cell('air'), `num ${v && v.air_in_line ? 'air-yes' : ''}`);
      }
    }

    function renderAlarms(d) {
      const list = sortedAlarms(d.active_alarms);
      setText(alarmCount, list.length ? `${list.length}` : '');
      setChildren(alarmList, alarmSignature(list), () => {
        if (list.length === 0) {
          return h('div', { class: 'no-alarms' }, h('span', { class: 'dot on' }), 'No active alarms');
        }
        return h('ul', { class: 'alarm-list' }, list.map((a) => h('li', { class: 'alarm-item', 'data-testid': 'alarm-item' },
          h('span', { class: `alarm-badge prio-${a.priority}` }, a.priority),
          h('div', null, h('span', { class: 'alarm-code' }, a.code, lineText(a) ? h('span', { class: 'alarm-line' }, lineText(a)) : null)),
          h('div', { class: 'alarm-detail' }, a.detail || ''),
          h('div', { class: 'alarm-since', 'data-changed': a.changed_ms }))));
      });
      for (const since of alarmList.querySelectorAll('.alarm-since')) {
        const ms = Number(since.dataset.changed);
        since.hidden = !hasTime(ms);
        setText(since, hasTime(ms) ? `since ${fmtDateTime(ms)} · ${fmtAgo(ms)}` : '');
      }
    }

    async function pullTelemetry(d, isCurrent) {
      const path = `api/devices/${encodeURIComponent(deviceId)}/telemetry?since_ms=`;
      for (let page = 0; page < MAX_TELEMETRY_PAGES; page++) {
        let since;
        if (telemetry.lastTime != null) since = telemetry.lastTime + 1;
        else {
          const latest = d.last_sample && Number.isFinite(d.last_sample.time_ms) ? d.last_sample.time_ms : serverNow();
          since = Math.floor(Math.min(latest, serverNow()) - CHART_WINDOW_MS);
        }
        const res = await api(path + since);
        if (!isCurrent()) return false;
        const samples = Array.isArray(res.samples) ? res.samples : [];
        for (const s of samples) {
          if (!s || !Number.isFinite(s.time_ms)) continue;
          if (telemetry.lastTime != null && s.time_ms <= telemetry.lastTime) continue;
          telemetry.samples.push(s);
          telemetry.lastTime = s.time_ms;
        }
        if (!res.truncated || samples.length === 0) break;
      }
      telemetry.loaded = true;
      if (telemetry.lastTime != null) {
        const keepFrom = telemetry.lastTime - CHART_WINDOW_MS - 5000;
        let drop = 0;
        while (drop < telemetry.samples.length && telemetry.samples[drop].time_ms < keepFrom) drop++;
        if (drop) telemetry.samples.splice(0, drop);
      }
      return true;
    }

    function redraw() {
      const drawn = drawTelemetry(canvas, telemetry.samples);
      setAttr(canvas, 'data-points', drawn);
      chartNote.hidden = drawn > 0;
      setText(chartNote, telemetry.loaded ? 'No telemetry in the last 2 minutes.' : 'Waiting for telemetry…');
      setText(chartMeta, drawn > 0 ? `last 2 minutes · ${fmtNum(drawn)} samples` : 'last 2 minutes');
    }

    const resize = new ResizeObserver(() => redraw());
    resize.observe(canvas);

    return {
      root,
      title: `${deviceId} · Nanofleet`,
      unmount() {
        resize.disconnect();
      },
      async refresh(isCurrent) {
        let d;
        try {
          [d] = await Promise.all([api(`api/devices/${encodeURIComponent(deviceId)}`), api('api/fleet').then(rememberSites)]);
        } catch (err) {
          if (err instanceof HttpError && err.status === 404) {
            if (isCurrent()) renderNotFound(err.message);
            return;
          }
          throw err;
        }
        if (!isCurrent()) return;
        if (root.dataset.missing) {
          // The device was registered after this page opened.
          onRoute();
          return;
        }
        renderHeader(d);
        renderProcess(d.last_sample);
        renderAlarms(d);
        if (await pullTelemetry(d, isCurrent)) redraw();
      },
    };
  }

  // === Telemetry chart ===

  const CHART = {
    aqueous: '#1f6fd1',
    ethanol: '#e07000',
    mixer: '#7a4fb3',
    air: '#c62828',
    grid: '#e6eaef',
    axis: '#9aa6b2',
    text: '#4d5b6a',
    title: '#18222e',
    font: '12px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif',
    phase: {
      IDLE: '#eceff3', SELF_TEST: '#dfe8f7', CARTRIDGE_VERIFY: '#dfe8f7', PRIME: '#dfe8f7', EQUILIBRATE: '#dfe8f7',
      START_WASTE: '#ebe3f6', END_WASTE: '#ebe3f6', COLLECT: '#d5efdd', BUFFER_EXCHANGE: '#d3ecec',
      FLUSH: '#e3e7f5', QC_SAMPLE: '#e3e7f5', COMPLETE: '#e4f4e9', ABORTED: '#f6dede',
    },
  };

  function niceStep(range, targetTicks) {
    const raw = range / Math.max(1, targetTicks);
    const mag = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  function stepDigits(step) {
    for (let d = 0; d < 4; d++) if (Math.abs(step * 10 ** d - Math.round(step * 10 ** d)) < 1e-9) return d;
    return 4;
  }

  function niceMax(max, floor) {
    const top = Math.max(max * 1.1, floor);
    const step = niceStep(top, 4);
    return { max: Math.ceil(top / step) * step, step };
  }

  /** Draws flow and pressure panels for the last two minutes; returns the samples drawn. */
  function drawTelemetry(canvas, all) {
    const rect = canvas.getBoundingClientRect();
    if (rect.width < 50 || rect.height < 50) return countVisible(all);
    const dpr = window.devicePixelRatio || 1;
    const W = Math.round(rect.width);
    const H = Math.round(rect.height);
    if (canvas.width !== Math.round(W * dpr) || canvas.height !== Math.round(H * dpr)) {
      canvas.width = Math.round(W * dpr);
      canvas.height = Math.round(H * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.font = CHART.font;

    const { xMin, xMax } = chartWindow(all);
    const samples = all.filter((s) => s.time_ms >= xMin && s.time_ms <= xMax);

    const left = 84;
    const right = 30;
    const phaseTop = 4;
    const phaseH = 20;
    const gap = 26;
    const bottomAxis = 30;
    const plotW = W - left - right;
    const panelTop1 = phaseTop + phaseH + 14;
    const panelH = Math.max(40, (H - panelTop1 - gap - bottomAxis) / 2);
    const panelTop2 = panelTop1 + panelH + gap;
    const x = (t) => left + ((t - xMin) / (xMax - xMin)) * plotW;

    // Phase strip: which step of the run the device was in at each moment.
    ctx.save();
    ctx.fillStyle = '#f4f6f8';
    ctx.fillRect(left, phaseTop, plotW, phaseH);
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    ctx.fillStyle = CHART.text;
    ctx.fillText('Phase', left - 10, phaseTop + phaseH / 2);
    for (const seg of phaseSegments(samples)) {
      const x0 = Math.max(left, x(seg.from));
      const x1 = Math.min(left + plotW, x(seg.to));
      if (x1 - x0 < 0.5) continue;
      ctx.fillStyle = CHART.phase[seg.phase] || '#e9edf2';
      ctx.fillRect(x0, phaseTop, x1 - x0, phaseH);
      ctx.fillStyle = 'rgba(255,255,255,0.9)';
      ctx.fillRect(x1 - 1, phaseTop, 1, phaseH);
      const label = phaseLabel(seg.phase);
      const tw = ctx.measureText(label).width;
      if (x1 - x0 > tw + 10) {
        ctx.fillStyle = CHART.title;
        ctx.textAlign = 'center';
        ctx.fillText(label, (x0 + x1) / 2, phaseTop + phaseH / 2 + 0.5);
      }
    }
    ctx.restore();

    const flowMax = maxOf(samples, (s) => [ml(s.aqueous, 'flow_ul_min'), ml(s.aqueous, 'flow_setpoint_ul_min'), ml(s.ethanol, 'flow_ul_min'), ml(s.ethanol, 'flow_setpoint_ul_min')]);
    const pMax = maxOf(samples, (s) => [s.aqueous && s.aqueous.pressure_mbar, s.ethanol && s.ethanol.pressure_mbar, s.mixer_pressure_drop_mbar]);

    const flowPanel = { top: panelTop1, height: panelH, ...niceMax(flowMax, 1), title: 'Flow', unit: 'mL/min', digits: 1 };
    const pPanel = { top: panelTop2, height: panelH, ...niceMax(pMax, 100), title: 'Pressure', unit: 'mbar', digits: 0 };
    flowPanel.digits = stepDigits(flowPanel.step);
    pPanel.digits = stepDigits(pPanel.step);

    const ticks = timeTicks(xMin, xMax);
    for (const panel of [flowPanel, pPanel]) drawPanelFrame(ctx, panel, left, plotW, ticks, x);

    const yOf = (panel) => (v) => panel.top + panel.height - (v / panel.max) * panel.height;
    const yf = yOf(flowPanel);
    const yp = yOf(pPanel);

    clipTo(ctx, left, flowPanel, plotW, () => {
      drawSeries(ctx, samples, x, yf, (s) => ml(s.aqueous, 'flow_setpoint_ul_min'), CHART.aqueous, 1.25, [5, 4], 0.75);
      drawSeries(ctx, samples, x, yf, (s) => ml(s.ethanol, 'flow_setpoint_ul_min'), CHART.ethanol, 1.25, [5, 4], 0.75);
      drawSeries(ctx, samples, x, yf, (s) => ml(s.aqueous, 'flow_ul_min'), CHART.aqueous, 2, null, 1);
      drawSeries(ctx, samples, x, yf, (s) => ml(s.ethanol, 'flow_ul_min'), CHART.ethanol, 2, null, 1);
    });
    drawAirMarks(ctx, samples, x, flowPanel.top + flowPanel.height);

    clipTo(ctx, left, pPanel, plotW, () => {
      drawSeries(ctx, samples, x, yp, (s) => s.mixer_pressure_drop_mbar, CHART.mixer, 1.5, null, 1);
      drawSeries(ctx, samples, x, yp, (s) => s.aqueous && s.aqueous.pressure_mbar, CHART.aqueous, 2, null, 1);
      drawSeries(ctx, samples, x, yp, (s) => s.ethanol && s.ethanol.pressure_mbar, CHART.ethanol, 2, null, 1);
    });

    // Time axis under the lower panel.
    ctx.fillStyle = CHART.text;
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    const axisY = pPanel.top + pPanel.height;
    for (const t of ticks) {
      const px = x(t);
      ctx.strokeStyle = CHART.axis;
      ctx.beginPath();
      ctx.moveTo(px + 0.5, axisY);
      ctx.lineTo(px + 0.5, axisY + 4);
      ctx.stroke();
      const label = fmtClock(t);
      const half = ctx.measureText(label).width / 2;
      // Keep clear of the axis title on the left and of the canvas edge on the right.
      if (px - half >= left - 2 && px + half <= W) ctx.fillText(label, px, axisY + 7);
    }
    ctx.textAlign = 'right';
    ctx.fillStyle = CHART.text;
    ctx.fillText('local time', left - 8, axisY + 7);

    return samples.length;
  }

  function countVisible(all) {
    const { xMin, xMax } = chartWindow(all);
    return all.filter((s) => s.time_ms >= xMin && s.time_ms <= xMax).length;
  }

  function chartWindow(all) {
    const last = all.length ? all[all.length - 1].time_ms : null;
    const now = serverNow();
    // Follow the wall clock so a device that stops reporting visibly falls behind; if its
    // last sample is older than the window, anchor on that sample instead of a blank chart.
    let xMax = now;
    if (last != null && last > now) xMax = last;
    if (last != null && last < now - CHART_WINDOW_MS) xMax = last;
    return { xMin: xMax - CHART_WINDOW_MS, xMax };
  }

  function ml(line, key) {
    return line && Number.isFinite(line[key]) ? line[key] / 1000 : null;
  }

  function maxOf(samples, pick) {
    let max = 0;
    for (const s of samples) for (const v of pick(s)) if (Number.isFinite(v) && v > max) max = v;
    return max;
  }

  function timeTicks(xMin, xMax) {
    const span = xMax - xMin;
    const step = span <= 150_000 ? 20_000 : span <= 600_000 ? 60_000 : 300_000;
    const out = [];
    for (let t = Math.ceil(xMin / step) * step; t <= xMax; t += step) out.push(t);
    return out;
  }

  function phaseSegments(samples) {
    const segs = [];
    for (let i = 0; i < samples.length; i++) {
      const s = samples[i];
      const next = samples[i + 1];
      const end = next && next.time_ms - s.time_ms <= GAP_MS ? next.time_ms : s.time_ms + 100;
      const cur = segs[segs.length - 1];
      if (cur && cur.phase === s.phase && s.time_ms - cur.to <= GAP_MS) cur.to = end;
      else segs.push({ phase: s.phase, from: s.time_ms, to: end });
    }
    return segs;
  }

  function drawPanelFrame(ctx, panel, left, plotW, ticks, x) {
    ctx.save();
    ctx.lineWidth = 1;
    ctx.font = CHART.font;
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    for (let v = 0; v <= panel.max + panel.step / 1000; v += panel.step) {
      const py = Math.round(panel.top + panel.height - (v / panel.max) * panel.height) + 0.5;
      ctx.strokeStyle = v === 0 ? CHART.axis : CHART.grid;
      ctx.beginPath();
      ctx.moveTo(left, py);
      ctx.lineTo(left + plotW, py);
      ctx.stroke();
      ctx.fillStyle = CHART.text;
      ctx.fillText(fmtNum(v, panel.digits), left - 8, py);
    }
    for (const t of ticks) {
      const px = Math.round(x(t)) + 0.5;
      ctx.strokeStyle = CHART.grid;
      ctx.beginPath();
      ctx.moveTo(px, panel.top);
      ctx.lineTo(px, panel.top + panel.height);
      ctx.stroke();
    }
    ctx.strokeStyle = CHART.axis;
    ctx.beginPath();
    ctx.moveTo(left + 0.5, panel.top);
    ctx.lineTo(left + 0.5, panel.top + panel.height);
    ctx.stroke();
    // Axis title, rotated along the left edge.
    ctx.translate(16, panel.top + panel.height / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = 'center';
    ctx.fillStyle = CHART.title;
    ctx.font = `600 ${CHART.font}`;
    ctx.fillText(`${panel.title} (${panel.unit})`, 0, 0);
    ctx.restore();
  }

  function clipTo(ctx, left, panel, plotW, draw) {
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, panel.top - 2, plotW, panel.height + 4);
    ctx.clip();
    draw();
    ctx.restore();
  }

  function drawSeries(ctx, samples, x, y, pick, color, width, dash, alpha) {
    ctx.save();
    ctx.strokeStyle = color;
    ctx.globalAlpha = alpha;
    ctx.lineWidth = width;
    ctx.lineJoin = 'round';
    ctx.setLineDash(dash || []);
    ctx.beginPath();
    let open = false;
    let prevT = null;
    for (const s of samples) {
      const v = pick(s);
      if (!Number.isFinite(v)) {
        open = false;
        continue;
      }
      const px = x(s.time_ms);
      const py = y(v);
      if (!open || prevT == null || s.time_ms - prevT > GAP_MS) ctx.moveTo(px, py);
      else ctx.lineTo(px, py);
      open = true;
      prevT = s.time_ms;
    }
    ctx.stroke();
    ctx.restore();
  }

  function drawAirMarks(ctx, samples, x, baseY) {
    ctx.save();
    ctx.fillStyle = CHART.air;
    for (const s of samples) {
      for (const [key, dy] of [['aqueous', 0], ['ethanol', -9]]) {
        if (!(s[key] && s[key].air_in_line)) continue;
        const px = x(s.time_ms);
        const py = baseY - 2 + dy;
        ctx.beginPath();
        ctx.moveTo(px, py - 7);
        ctx.lineTo(px - 4, py);
        ctx.lineTo(px + 4, py);
        ctx.closePath();
        ctx.fill();
      }
    }
    ctx.restore();
  }

  // === Enrollment tokens ===

  const EXPIRY_CHOICES = [[3600, '1 hour'], [86_400, '24 hours'], [604_800, '7 days']];
  const DEFAULT_EXPIRY = 86_400;
  const TOKEN_COLUMNS = ['Token', 'Site', 'Device', 'Uses left', 'Created', 'Expires', 'State'];
  const GRPC_PLACEHOLDER = "<the server's gRPC address>";

  /** A labelled form control, with an optional hint that screen readers read with it. */
  function field(control, label, hint) {
    const hintEl = hint ? h('span', { class: 'hint', id: `${control.id}-hint` }, hint) : null;
    if (hintEl) control.setAttribute('aria-describedby', hintEl.id);
    return h('div', { class: 'field' }, h('label', { for: control.id }, label), control, hintEl);
  }

  function selectText(node) {
    const range = document.createRange();
    range.selectNodeContents(node);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  /** A button that copies `node`'s text; where the clipboard is not available it selects it. */
  function copyButton(label, node) {
    const btn = h('button', { type: 'button', class: 'btn btn-small' }, label);
    btn.addEventListener('click', async () => {
      let copied = false;
      try {
        await navigator.clipboard.writeText(node.textContent);
        copied = true;
      } catch (e) {
        selectText(node);
      }
      setText(btn, copied ? 'Copied' : 'Press Ctrl+C');
      clearTimeout(btn._reset);
      btn._reset = setTimeout(() => setText(btn, label), 2500);
    });
    return btn;
  }

  function enrollView() {
    let busy = false;
    let mounted = true;

    const siteSelect = h('select', { id: 'enroll-site', name: 'site', required: true, 'data-testid': 'enroll-site' });
    const expires = h('select', { id: 'enroll-expires', name: 'expires', 'data-testid': 'enroll-expires' },
      EXPIRY_CHOICES.map(([secs, label]) => h('option', { value: secs, selected: secs === DEFAULT_EXPIRY }, label)));
    const uses = h('input', {
      id: 'enroll-uses', name: 'uses', type: 'number', min: 1, max: 10_000, step: 1, value: 1, required: true,
      inputmode: 'numeric', 'data-testid': 'enroll-uses',
    });
    const deviceId = h('input', {
      id: 'enroll-device', name: 'device_id', autocomplete: 'off', autocapitalize: 'characters', spellcheck: 'false',
      placeholder: 'assigned on enrollment', 'data-testid': 'enroll-device',
    });
    const reason = h('input', { id: 'enroll-reason', name: 'reason', autocomplete: 'off', 'data-testid': 'enroll-reason' });
    const submit = h('button', { type: 'submit', class: 'btn btn-primary', 'data-testid': 'enroll-submit' }, 'Create token');
    const error = h('p', { class: 'form-error', role: 'alert', 'data-testid': 'enroll-error', hidden: true });
    // Shown only when the site is fixed (site IT), so a disabled select still says why.
    const siteField = field(siteSelect, 'Site', 'Your site');
    const siteHint = siteField.querySelector('.hint');
    siteHint.hidden = true;

    const form = h('form', {
      class: 'card enroll-form', 'data-testid': 'enroll-form', 'aria-labelledby': 'enroll-form-title',
      onsubmit: (ev) => {
        ev.preventDefault();
        create();
      },
    },
    h('div', { class: 'card-head' }, h('h2', { id: 'enroll-form-title' }, 'New enrollment token'),
      h('span', { class: 'muted' }, 'The device presents it once to get its certificate')),
    h('div', { class: 'card-body form-grid' },
      siteField,
      field(expires, 'Expires after'),
      field(uses, 'Uses', 'Devices it may enroll'),
      field(deviceId, 'Device id (optional)', 'Only with 1 use'),
      field(reason, 'Reason', 'Kept in the audit trail')),
    h('div', { class: 'form-actions' }, submit, error));

    const roleNote = h('div');
    const secretSlot = h('div', { 'aria-live': 'polite' });
    const listMeta = h('span', { class: 'muted' });
    const tbody = h('tbody');
    const listSection = h('section', { class: 'section' },
      h('div', { class: 'section-head' }, h('h2', null, 'Enrollment tokens'), listMeta),
      h('div', { class: 'card table-wrap' },
        h('table', { class: 'grid', 'data-testid': 'enroll-tokens' },
          h('thead', null, h('tr', null, TOKEN_COLUMNS.map((name) => h('th', { class: name === 'Uses left' ? 'num' : null }, name)))),
          tbody)));

    const root = h('div', { class: 'enroll' },
      h('div', { class: 'page-title' }, h('h1', null, 'Enroll a device'),
        h('span', { class: 'muted' }, 'Tokens that let a new device join a site, each usable a limited number of times')),
      roleNote, form, secretSlot, listSection);

    function showError(message) {
      error.hidden = !message;
      setText(error, message || '');
    }

    function renderAccess() {
      const role = state.me ? state.me.role : '';
      const mayCreate = can(ENROLL_CREATE_ROLES);
      const mayList = can(ENROLL_LIST_ROLES);
      form.hidden = !mayCreate;
      listSection.hidden = !mayList;
      const who = ROLE_LABEL[role] || role;
      setChildren(roleNote, `${role}|${mayCreate}|${mayList}`, () => {
        if (mayCreate) return null;
        return h('p', { class: 'card note', 'data-testid': 'enroll-role-note' }, mayList
          ? `Your role (${who}) can see enrollment tokens but not create them.`
          : `Enrollment tokens are handled by operations and site IT; your role (${who}) has no access to them.`);
      });
    }

    function renderSiteOptions() {
      const me = state.me;
      let sites = [...state.sites.values()].sort((a, b) => (a.name || a.id).localeCompare(b.name || b.id, LOCALE));
      // Site IT enrolls into its own site only; the server refuses any other.
      const fixed = me.role === 'site-it' && me.site_id;
      if (fixed) sites = [state.sites.get(me.site_id) || { id: me.site_id, name: me.site_id }];
      reconcile(siteSelect, sites, (s) => s.id, (s) => h('option', { value: s.id }), (opt, s) => setText(opt, s.name || s.id));
      siteSelect.disabled = Boolean(fixed);
      siteHint.hidden = !fixed;
    }

    function renderSecret(res) {
      const t = res.token || {};
      const secret = String(res.secret_token);
      const code = h('code', { class: 'secret-value', 'data-testid': 'enroll-secret' }, secret);
      const command = h('code', { class: 'secret-value', 'data-testid': 'enroll-command' },
        'nanofleet-agent enroll --server ', h('var', null, GRPC_PLACEHOLDER), ` --token ${secret}`);
      const where = siteName(t.site_id);
      const limits = `${fmtNum(t.uses_allowed)} use${t.uses_allowed === 1 ? '' : 's'} · expires ${fmtDateTime(t.expires_unix_ms)}`
        + (t.device_id ? ` · device id ${t.device_id}` : '');
      secretSlot.replaceChildren(h('section', {
        class: 'card secret', 'data-testid': 'enroll-created', 'data-token-id': t.id, 'aria-labelledby': 'enroll-secret-title',
      },
      h('div', { class: 'card-head' }, h('h2', { id: 'enroll-secret-title' }, `Token ${t.id} for ${where}`), h('span', { class: 'muted' }, limits)),
      h('div', { class: 'card-body' },
        h('p', { class: 'secret-warning' }, h('strong', null, 'Shown only now. '),
          `Whoever holds this token can enroll a device into ${where} until it is used up or expires. Copy it now: it cannot be shown again.`),
        h('div', { class: 'secret-row' }, code, copyButton('Copy token', code)),
        h('p', { class: 'secret-label' }, 'On the device, run:'),
        h('div', { class: 'secret-row' }, command, copyButton('Copy command', command)),
        h('p', { class: 'hint' }, `Replace ${GRPC_PLACEHOLDER} with the address devices reach the server's gRPC port at, as https://HOST:PORT.`),
        h('div', { class: 'form-actions' },
          h('button', { type: 'button', class: 'btn', onclick: () => secretSlot.replaceChildren() }, 'Done, hide the token')))));
    }

    async function create() {
      if (busy) return;
      const body = {
        site_id: siteSelect.value,
        expires_in_seconds: Number(expires.value),
        uses: Number(uses.value),
        device_id: deviceId.value.trim(),
        reason: reason.value.trim(),
      };
      busy = true;
      submit.disabled = true;
      setText(submit, 'Creating…');
      showError(null);
      try {
        const res = await api('api/enroll-tokens', { method: 'POST', body });
        if (!res || typeof res.secret_token !== 'string' || !res.token) {
          throw new HttpError(200, 'the server answered without the token');
        }
        if (!mounted) return;
        renderSecret(res);
        deviceId.value = '';
        reason.value = '';
        refreshNow();
      } catch (err) {
        if (!mounted) return;
        if (isSignedOutError(err)) {
          showError('Your session had ended, so no token was created. Create it again.');
          showLogin(SESSION_ENDED);
        } else if (err instanceof UnreachableError) {
          showError(err.message === 'request timed out'
            ? 'The server did not answer in time; check the list below before trying again.'
            : 'Server unreachable: no token was created.');
        } else {
          showError(sentence(err.message));
        }
      } finally {
        busy = false;
        submit.disabled = false;
        setText(submit, 'Create token');
      }
    }

    function createTokenRow(t) {
      const cells = TOKEN_COLUMNS.map((name) => h('td', { class: { 'Uses left': 'num', Site: 'site' }[name] || null }));
      const [id, , , , created, expiresCell, stateCell] = cells;
      id.className = 'mono';
      created.append(h('span', { class: 'when' }), h('span', { class: 'sub' }));
      expiresCell.append(h('span', { class: 'when' }), h('span', { class: 'sub' }));
      stateCell.append(h('span', { class: 'token-state' }));
      const row = h('tr', { 'data-testid': 'token-row', 'data-token-id': t.id }, cells);
      row._cells = cells;
      return row;
    }

    function updateTokenRow(row, t) {
      const [id, site, device, usesCell, created, expiresCell, stateCell] = row._cells;
      const st = String(t.state || '');
      setAttr(row, 'data-state', st);
      setAttr(row, 'data-site-id', t.site_id);
      setClass(row, st === 'usable' ? '' : 'inactive');
      setText(id, t.id);
      setText(site, siteName(t.site_id));
      setChildren(device, `${t.device_id}|${t.replacement}`, () => [
        t.device_id ? h('span', { class: 'mono' }, t.device_id) : h('span', { class: 'muted' }, 'assigned on enrollment'),
        t.replacement ? h('span', { class: 'sub' }, 'replacement unit') : null]);
      setText(usesCell, `${fmtNum(t.uses_left)} of ${fmtNum(t.uses_allowed)}`);
      setText(created.firstChild, fmtDateTime(t.created_unix_ms));
      // Actors are "person:ID" or "system"; the person's id is what people recognise.
      setText(created.lastChild, t.created_by ? `by ${String(t.created_by).replace(/^person:/, '')}` : '');
      setAttr(created, 'title', t.created_by || null);
      setText(expiresCell.firstChild, fmtDateTime(t.expires_unix_ms));
      let note = '';
      if (st === 'revoked') note = `revoked ${fmtDateTime(t.revoked_unix_ms)}`;
      else if (st === 'usable' && hasTime(t.expires_unix_ms)) note = `in ${fmtDuration(t.expires_unix_ms - serverNow())}`;
      else if (st === 'expired') note = fmtAgo(t.expires_unix_ms);
      setText(expiresCell.lastChild, note);
      setText(stateCell.firstChild, st || '—');
      setClass(stateCell.firstChild, `token-state state-${st || 'unknown'}`);
    }

    function renderTokens(tokens) {
      const list = tokens.slice().sort((a, b) => (b.created_unix_ms || 0) - (a.created_unix_ms || 0) || byId(a, b));
      const usable = list.filter((t) => t.state === 'usable').length;
      setText(listMeta, list.length ? `${fmtNum(usable)} usable of ${fmtNum(list.length)}, newest first` : '');
      if (list.length === 0) {
        setChildren(tbody, 'empty', () => h('tr', null, h('td', { class: 'empty', colspan: TOKEN_COLUMNS.length }, 'No enrollment tokens yet.')));
        return;
      }
      delete tbody.dataset.sig;
      reconcile(tbody, list, (t) => t.id, createTokenRow, updateTokenRow);
    }

    // The person is usually known already: show the right parts before the first answer.
    renderAccess();

    return {
      root,
      title: 'Enroll a device · Nanofleet',
      unmount() {
        mounted = false;
      },
      async refresh(isCurrent) {
        const mayList = can(ENROLL_LIST_ROLES);
        const [fleet, list] = await Promise.all([api('api/fleet'), mayList ? api('api/enroll-tokens') : null]);
        if (!isCurrent()) return;
        rememberSites(fleet);
        renderAccess();
        if (can(ENROLL_CREATE_ROLES)) renderSiteOptions();
        if (list) renderTokens(Array.isArray(list.tokens) ? list.tokens : []);
      },
    };
  }

  // === Recipes ===

  const RECIPE_COLUMNS = ['Recipe', 'Version', 'Name', 'Status', 'Drafted by', 'Signatures'];
  const RECIPE_STATUS_CHOICES = [['', 'All statuses'], ['draft', 'Draft'], ['authored', 'Authored'], ['released', 'Released'], ['rejected', 'Rejected']];
  const DELIVERY_STATES = ['accepted', 'refused', 'pending'];
  const DELIVERY_COLUMNS = ['Device', 'Site', 'State', 'Refusal', 'Sent', 'Answered'];
  const PAYLOAD_LABEL = { MRNA: 'mRNA', SIRNA: 'siRNA', SARNA: 'saRNA', DNA: 'DNA' };
  const MEANING_NOTE = {
    authored: 'Author: wrote this version and vouches for it',
    approved: 'Approval: reviewed by QA and released for use',
  };

  /**
   * "2025-11-26 11:40:03 UTC": signatures and recipe records are read in UTC everywhere.
   * Table columns that say UTC in their heading leave the suffix out.
   */
  function fmtUtc(ms, suffix = true) {
    const n = Number(ms);
    if (!hasTime(n)) return '—';
    return new Date(n).toISOString().replace('T', ' ').replace(/\.\d+Z$/, suffix ? ' UTC' : '');
  }

  /** A quantity with the decimals it has, up to `max`: 50, 38.5, 0.2. */
  function fmtQty(v, max = 3) {
    const n = Number(v);
    if (v == null || v === '' || !Number.isFinite(n)) return '—';
    return n.toLocaleString(LOCALE, { maximumFractionDigits: max });
  }

  /** An enum of the recipe's JSON without its prefix: RUN_PHASE_COLLECT becomes COLLECT. */
  function enumValue(v, prefix) {
    const s = String(v || '');
    return s.startsWith(prefix) ? s.slice(prefix.length) : s;
  }

  function recipeHash(id, version) {
    return `#/recipes/${encodeURIComponent(id)}/${version}`;
  }

  function recipeStatusBadge(status) {
    return h('span', { class: `recipe-status status-${status || 'unknown'}`, 'data-testid': 'recipe-status' }, status || 'unknown');
  }

  /** "Alice Martin, PharmD — authored — 2025-11-26 11:40:03 UTC" */
  function signatureLine(s) {
    return `${s.printed_name || s.signer_id} — ${s.meaning} — ${fmtUtc(s.signed_unix_ms)}`;
  }

  /** A label and its value with an optional unit and note, for a definition list. */
  function spec(label, value, unit, note) {
    return h('div', null, h('dt', null, label),
      h('dd', null, value, unit ? h('span', { class: 'unit' }, unit) : null, note ? h('span', { class: 'sub' }, note) : null));
  }

  function rangeText(r) {
    return r ? `${fmtQty(r.min)}–${fmtQty(r.max)}` : '—';
  }

  function recipesView(route) {
    let selected = { id: route.id || '', version: route.version || 0 };
    let status = '';
    // The version the detail shows: the selected one, or the newest when none was named.
    let shown = null;
    // The detail's delivery part, built once per selection and updated in place.
    let delivery = null;
    // The detail is scrolled into view once per selection, when it opens below the fold.
    let revealed = false;
    // What the detail holds: null (nothing yet), 'hint', 'missing' or 'version'.
    let mode = null;

    const filter = h('select', {
      id: 'recipe-status-filter',
      'data-testid': 'recipe-status-filter',
      onchange: () => {
        status = filter.value;
        refreshNow();
      },
    }, RECIPE_STATUS_CHOICES.map(([value, label]) => h('option', { value }, label)));
    const count = h('span', { class: 'count', 'data-testid': 'recipe-count' });
    const tbody = h('tbody');
    const roleNote = h('div');
    const listSection = h('div', null,
      h('div', { class: 'toolbar' }, h('label', { for: 'recipe-status-filter' }, 'Status'), filter, count),
      h('div', { class: 'card table-wrap' },
        h('table', { class: 'grid', 'data-testid': 'recipe-table' },
          h('thead', null, h('tr', null, RECIPE_COLUMNS.map((name) => h('th', { class: name === 'Version' ? 'num' : null }, name)))),
          tbody)));
    // The selected version: a heading card, its signatures beside its delivery, then its content.
    const headSlot = h('div');
    const signaturesSlot = h('div');
    const deliverySlot = h('div');
    const statusGrid = h('div', { class: 'recipe-status-grid', hidden: true }, signaturesSlot, deliverySlot);
    const contentSlot = h('div');
    const detail = h('section', { class: 'recipe-detail', 'aria-label': 'Selected recipe version' }, headSlot, statusGrid, contentSlot);

    const root = h('div', { class: 'recipes' },
      h('div', { class: 'page-title' }, h('h1', null, 'Recipes'),
        h('span', { class: 'muted' }, 'Master recipes, their electronic signatures and their delivery to devices')),
      roleNote, listSection, detail);

    function renderAccess() {
      const role = state.me ? state.me.role : '';
      const may = can(RECIPE_ROLES);
      listSection.hidden = !may;
      detail.hidden = !may;
      setChildren(roleNote, `${role}|${may}`, () => (may ? null
        : h('p', { class: 'card note', 'data-testid': 'recipes-role-note' },
          `Recipes are read by operations, pharmacists, QA and auditors; your role (${ROLE_LABEL[role] || role}) has no access to them.`)));
    }

    function isShown(v) {
      return shown != null && v.recipe_id === shown.recipe_id && v.version === shown.version;
    }

    // --- the list of versions ---

    function createRow(v) {
      const cells = RECIPE_COLUMNS.map((name) => h('td', { class: { Version: 'num', Name: 'wrap', Signatures: 'wrap' }[name] || null }));
      const row = h('tr', { class: 'link', 'data-testid': 'recipe-row', 'data-recipe-id': v.recipe_id, 'data-version': v.version }, cells);
      row.addEventListener('click', (ev) => {
        if (ev.target.closest('a')) return;
        navigate(recipeHash(v.recipe_id, v.version));
      });
      row._cells = cells;
      return row;
    }

    function updateRow(row, v) {
      const [id, version, name, st, drafted, signatures] = row._cells;
      const on = isShown(v);
      setAttr(row, 'data-status', v.status);
      setAttr(row, 'aria-selected', on ? 'true' : 'false');
      setClass(row, `link${on ? ' selected' : ''}${v.status === 'rejected' ? ' inactive' : ''}`);
      setChildren(id, v.recipe_id, () => h('a', { class: 'id-link', href: recipeHash(v.recipe_id, v.version) }, v.recipe_id));
      setText(version, v.version);
      setText(name, v.name || '—');
      setChildren(st, v.status, () => recipeStatusBadge(v.status));
      setChildren(drafted, `${v.created_by}|${v.created_unix_ms}`, () => [
        h('span', null, v.created_by || '—'), h('span', { class: 'sub' }, fmtUtc(v.created_unix_ms))]);
      const list = v.signatures || [];
      setChildren(signatures, list.map(signatureLine).join('\n'), () => (list.length
        ? list.map((s) => h('span', { class: 'sig-line', 'data-testid': 'recipe-row-signature', 'data-meaning': s.meaning }, signatureLine(s)))
        : h('span', { class: 'muted' }, 'not signed')));
    }

    function renderList(versions) {
      const recipes = new Set(versions.map((v) => v.recipe_id)).size;
      setText(count, versions.length
        ? `${fmtNum(versions.length)} version${versions.length === 1 ? '' : 's'} of ${fmtNum(recipes)} recipe${recipes === 1 ? '' : 's'}`
        : '');
      if (versions.length === 0) {
        setChildren(tbody, `empty|${status}`, () => h('tr', null, h('td', { class: 'empty', colspan: RECIPE_COLUMNS.length },
          status ? `No ${status} recipe versions.`
            : ['No recipes yet: pharmacists draft them with ', h('code', null, 'nanofleet recipes draft'), '.'])));
        return;
      }
      delete tbody.dataset.sig;
      reconcile(tbody, versions, (v) => `${v.recipe_id}|${v.version}`, createRow, updateRow);
    }

    // --- the selected version ---

    function clearDetail() {
      for (const slot of [headSlot, signaturesSlot, deliverySlot, contentSlot]) {
        slot.replaceChildren();
        delete slot.dataset.sig;
      }
      for (const name of ['data-testid', 'data-recipe-id', 'data-version', 'data-status']) setAttr(detail, name, null);
      statusGrid.hidden = true;
      delivery = null;
      mode = null;
    }

    function setMode(next) {
      if (mode === next) return;
      clearDetail();
      mode = next;
    }

    function renderNothingSelected() {
      setMode('hint');
      setChildren(headSlot, 'none', () => h('p', { class: 'card note', 'data-testid': 'recipe-hint' },
        'Select a version to see its formula, procedure, release criteria, electronic signatures and delivery to devices.'));
    }

    function renderMissing(message) {
      setMode('missing');
      setChildren(headSlot, message, () => h('section', { class: 'card notice', 'data-testid': 'recipe-missing' },
        h('h1', null, `Recipe ${selected.id}${selected.version ? ` version ${selected.version}` : ''} not found`),
        h('p', { class: 'muted' }, sentence(message)),
        h('p', null, h('a', { href: '#/recipes' }, 'Back to all recipes'))));
    }

    function headCard(v) {
      const r = v.recipe || {};
      const eq = r.equipment || {};
      const payload = enumValue(r.payload, 'PAYLOAD_KIND_');
      const facts = [
        spec('Payload', PAYLOAD_LABEL[payload] || payload || '—'),
        spec('Cartridge GTIN', h('span', { class: 'mono' }, r.cartridge_gtin || '—')),
        spec('Device models', (eq.models || []).join(', ') || '—', null, eq.min_firmware ? `firmware ${eq.min_firmware} or later` : null),
        spec('Valid from', fmtUtc(r.valid_from_unix_ms), null, `until ${fmtUtc(r.valid_until_unix_ms)}`),
        spec('Drafted by', v.created_by || '—', null, fmtUtc(v.created_unix_ms)),
        v.status === 'released' ? spec('Released', fmtUtc(v.released_unix_ms)) : null,
        v.status === 'rejected' ? spec('Rejected by', v.rejected_by || '—', null, v.rejected_reason || null) : null,
      ];
      return h('section', { class: 'card recipe-head' },
        h('div', { class: 'recipe-title' },
          h('h2', null, h('span', { class: 'mono' }, r.recipe_id || v.recipe_id), h('span', { class: 'recipe-version' }, `version ${v.version}`)),
          recipeStatusBadge(v.status),
          h('span', { class: 'recipe-name' }, v.name || '')),
        h('dl', { class: 'facts' }, facts),
        h('div', { class: 'recipe-digest' },
          h('span', { class: 'digest-label' }, 'SHA-256 of the recipe, as signed'),
          h('code', { class: 'digest', 'data-testid': 'recipe-digest' }, v.digest || '—')),
        r.description ? h('p', { class: 'recipe-description' }, r.description) : null);
    }

    function signaturesCard(v) {
      const list = v.signatures || [];
      const waiting = { draft: 'Waiting for its author to sign it.', authored: 'Waiting for QA approval.' }[v.status];
      return h('section', { class: 'card', 'data-testid': 'recipe-signatures' },
        h('div', { class: 'card-head' }, h('h2', null, 'Electronic signatures'), h('span', { class: 'muted' }, '21 CFR Part 11')),
        list.length === 0 && !waiting ? h('div', { class: 'empty' }, 'Not signed.') : null,
        list.length ? h('ol', { class: 'signature-list' }, list.map((s) => h('li', {
          class: 'signature', 'data-testid': 'recipe-signature', 'data-meaning': s.meaning, 'data-signer-id': s.signer_id,
        },
        h('span', { class: `sig-meaning meaning-${s.meaning}` }, s.meaning),
        h('div', { class: 'sig-main' },
          h('div', { class: 'sig-name', 'data-testid': 'signature-name' }, s.printed_name || s.signer_id),
          h('div', { class: 'sig-when' },
            h('span', { class: 'sig-time', 'data-testid': 'signature-time' }, fmtUtc(s.signed_unix_ms)),
            h('span', { class: 'muted', title: s.key_id ? `signing key ${s.key_id}` : null }, ` · user ${s.signer_id}`)),
          h('div', { class: 'sub' }, MEANING_NOTE[s.meaning] || s.meaning))))) : null,
        waiting ? h('p', { class: 'sig-waiting' }, waiting) : null,
        h('p', { class: 'sig-footnote' },
          'Each signature binds the signer\'s printed name, the date and time and its meaning to the exact recipe bytes of the SHA-256 above.'));
    }

    function formulaCard(r) {
      const f = r.formula || {};
      const l = f.lipids || {};
      const buffer = enumValue(f.buffer, 'BUFFER_KIND_').toLowerCase();
      return h('section', { class: 'card', 'data-testid': 'recipe-formula' },
        h('div', { class: 'card-head' }, h('h2', null, 'Formula')),
        h('div', { class: 'card-body' }, h('dl', { class: 'spec' },
          spec('Lipids', `${fmtQty(l.ionizable)} : ${fmtQty(l.phospholipid)} : ${fmtQty(l.cholesterol)} : ${fmtQty(l.peg_lipid)}`, 'mol %',
            'ionizable : phospholipid : cholesterol : PEG-lipid'),
          spec('N/P ratio', fmtQty(f.np_ratio)),
          spec('Flow-rate ratio (FRR)', `${fmtQty(f.flow_rate_ratio)} : 1`, null, 'aqueous : ethanol'),
          spec('Total flow rate (TFR)', fmtQty(f.total_flow_ml_min), 'mL/min'),
          spec('Lipid concentration', fmtQty(f.lipid_concentration_mg_ml), 'mg/mL', 'in the ethanol phase'),
          spec('Buffer', `${buffer && buffer !== 'unspecified' ? buffer : '—'} ${fmtQty(f.buffer_mm)}`, 'mM', `pH ${fmtQty(f.buffer_ph, 2)}`),
          spec('Dose', fmtQty(f.dose_ug), 'µg', 'nucleic acid per batch'),
          spec('Batch volume', fmtQty(f.batch_volume_ml), 'mL'),
          spec('Mixing temperature', fmtQty(f.temperature_c, 1), '°C'))));
    }

    function procedureCard(r) {
      const steps = r.procedure || [];
      const total = steps.reduce((s, p) => s + (Number(p.duration_s) || 0), 0);
      return h('section', { class: 'card', 'data-testid': 'recipe-procedure' },
        h('div', { class: 'card-head' }, h('h2', null, 'Procedure'),
          h('span', { class: 'muted' }, `${steps.length} step${steps.length === 1 ? '' : 's'} · ${fmtDuration(total * 1000)}`)),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid procedure' },
          h('thead', null, h('tr', null, h('th', { class: 'num' }, '#'), h('th', null, 'Phase'),
            h('th', { class: 'num' }, 'Duration', h('span', { class: 'unit' }, ' s')),
            h('th', { class: 'num' }, 'Flow', h('span', { class: 'unit' }, ' mL/min')),
            h('th', { class: 'num' }, 'Temp.', h('span', { class: 'unit' }, ' °C')))),
          h('tbody', null, steps.length === 0
            ? h('tr', null, h('td', { class: 'empty', colspan: 5 }, 'No steps.'))
            : steps.map((p, i) => {
              const phase = enumValue(p.phase, 'RUN_PHASE_');
              const temp = Number(p.temperature_c);
              return h('tr', { 'data-testid': 'procedure-step' },
                h('td', { class: 'num muted' }, i + 1),
                h('td', null, h('span', { class: phaseClass(phase) }, phaseLabel(phase))),
                h('td', { class: 'num' }, fmtQty(p.duration_s)),
                h('td', { class: 'num' }, Number(p.total_flow_ml_min) > 0
                  ? fmtQty(p.total_flow_ml_min)
                  : h('span', { class: 'muted', title: 'no fluid moves' }, '—')),
                // 0 keeps the formula's mixing temperature.
                h('td', { class: 'num' }, temp
                  ? fmtQty(temp, 1)
                  : h('span', { class: 'muted', title: "the formula's mixing temperature" }, fmtQty((r.formula || {}).temperature_c, 1))));
            })))));
    }

    function criteriaCard(r) {
      const c = r.release_criteria || {};
      const t = r.targets || {};
      const sites = t.site_ids || [];
      const devices = t.device_ids || [];
      return h('section', { class: 'card', 'data-testid': 'recipe-criteria' },
        h('div', { class: 'card-head' }, h('h2', null, 'Release criteria')),
        h('div', { class: 'card-body' }, h('dl', { class: 'spec' },
          spec('Particle size', rangeText(c.size_nm), 'nm', 'Z-average'),
          spec('Polydispersity (PDI)', `≤ ${fmtQty(c.pdi_max)}`),
          spec('Encapsulation', `≥ ${fmtQty(c.encapsulation_min_pct)}`, '%'),
          spec('Final pH', rangeText(c.ph)))),
        h('div', { class: 'card-head card-head-inner' }, h('h2', null, 'Targets')),
        h('div', { class: 'card-body', 'data-testid': 'recipe-targets' }, h('dl', { class: 'spec' },
          spec('Sites', sites.length ? sites.map((s, i) => [i ? ', ' : '', h('a', { href: `#/devices?site=${encodeURIComponent(s)}` }, siteName(s))]) : '—'),
          spec('Devices', devices.length ? devices.map((d, i) => [i ? ', ' : '', h('a', { class: 'mono', href: deviceHash(d) }, d)]) : '—'))));
    }

    function renderVersion(v) {
      setMode('version');
      statusGrid.hidden = false;
      setAttr(detail, 'data-testid', 'recipe-detail');
      setAttr(detail, 'data-recipe-id', v.recipe_id);
      setAttr(detail, 'data-version', v.version);
      setAttr(detail, 'data-status', v.status);
      // Released versions never change; drafts may, and the site names come with each refresh.
      const sig = `${JSON.stringify(v)}|${[...state.sites.values()].map((s) => `${s.id}=${s.name}`).join(';')}`;
      const r = v.recipe || {};
      setChildren(headSlot, sig, () => headCard(v));
      setChildren(signaturesSlot, sig, () => signaturesCard(v));
      setChildren(contentSlot, sig, () => h('div', { class: 'recipe-grid' }, formulaCard(r), procedureCard(r), criteriaCard(r)));
    }

    function buildDelivery() {
      const bar = h('div', { class: 'delivery-bar', 'data-testid': 'delivery-bar', role: 'img' });
      const segs = {};
      const counts = {};
      for (const st of DELIVERY_STATES) {
        segs[st] = h('span', { class: `seg seg-${st}` });
        bar.append(segs[st]);
      }
      const legend = h('div', { class: 'delivery-legend' }, DELIVERY_STATES.map((st) => {
        counts[st] = h('strong', { 'data-testid': `delivery-${st}` }, '0');
        return h('span', null, h('i', { class: `seg-${st}` }), counts[st], ` ${st}`);
      }));
      const meta = h('span', { class: 'muted' });
      const body = h('tbody');
      const card = h('section', { class: 'card recipe-delivery', 'data-testid': 'recipe-delivery' },
        h('div', { class: 'card-head' }, h('h2', null, 'Delivery to devices'), meta),
        h('div', { class: 'card-body' }, bar, legend),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'data-testid': 'delivery-table' },
          h('thead', null, h('tr', null, DELIVERY_COLUMNS.map((name) => h('th', null, name,
            name === 'Sent' || name === 'Answered' ? h('span', { class: 'unit' }, ' UTC') : null)))),
          body)));
      deliverySlot.replaceChildren(card);
      return { bar, segs, counts, meta, body };
    }

    function createDeliveryRow(d) {
      const cells = DELIVERY_COLUMNS.map((name) => h('td', { class: { Site: 'site', Refusal: 'refusal' }[name] || null }));
      const row = h('tr', { 'data-testid': 'delivery-row', 'data-device-id': d.device_id }, cells);
      row._cells = cells;
      return row;
    }

    function updateDeliveryRow(row, d) {
      const [device, site, st, refusal, sent, answered] = row._cells;
      setAttr(row, 'data-state', d.state);
      setChildren(device, d.device_id, () => h('a', { class: 'id-link', href: deviceHash(d.device_id) }, d.device_id));
      setText(site, siteName(d.site_id));
      setChildren(st, d.state, () => h('span', { class: `delivery-state state-${d.state}` }, d.state));
      setChildren(refusal, `${d.code}|${d.reason}`, () => (d.code || d.reason
        ? [h('span', { class: 'mono refusal-code' }, d.code || '—'), d.reason ? h('span', { class: 'sub' }, d.reason) : null]
        : h('span', { class: 'muted' }, '—')));
      setText(sent, fmtUtc(d.sent_unix_ms, false));
      setText(answered, fmtUtc(d.answered_unix_ms, false));
    }

    function renderDeliveries(v, res) {
      if (!delivery) delivery = buildDelivery();
      const list = (Array.isArray(res.deliveries) ? res.deliveries : []).slice()
        .sort((a, b) => siteName(a.site_id).localeCompare(siteName(b.site_id), LOCALE) || byId({ id: a.device_id }, { id: b.device_id }));
      const c = res.counts || {};
      const n = Object.fromEntries(DELIVERY_STATES.map((st) => [st, Number(c[st]) || 0]));
      const total = list.length;
      for (const st of DELIVERY_STATES) {
        const width = `${total ? (100 * n[st]) / total : 0}%`;
        if (delivery.segs[st].style.width !== width) delivery.segs[st].style.width = width;
        setAttr(delivery.segs[st], 'title', `${fmtNum(n[st])} ${st}`);
        setAttr(delivery.bar, `data-${st}`, n[st]);
        setText(delivery.counts[st], fmtNum(n[st]));
      }
      setAttr(delivery.bar, 'data-total', total);
      setAttr(delivery.bar, 'aria-label', `${n.accepted} accepted, ${n.refused} refused, ${n.pending} pending of ${total} devices`);
      setText(delivery.meta, total
        ? `${fmtNum(total)} device${total === 1 ? '' : 's'} · ${fmtNum((100 * n.accepted) / total)} % accepted`
        : '');
      if (list.length === 0) {
        let why = 'Sent to its target devices once QA approves it.';
        if (v.status === 'rejected') why = 'Rejected: never sent to devices.';
        else if (v.status === 'released') {
          why = state.me && state.me.site_id ? 'No delivery to a device of your site.' : 'No target device was enrolled when it was released.';
        }
        setChildren(delivery.body, `empty|${why}`, () => h('tr', null, h('td', { class: 'empty', colspan: DELIVERY_COLUMNS.length }, why)));
        return;
      }
      delete delivery.body.dataset.sig;
      reconcile(delivery.body, list, (d) => `${d.device_id}|${d.version}`, createDeliveryRow, updateDeliveryRow);
    }

    function reveal() {
      if (revealed) return;
      revealed = true;
      const top = detail.getBoundingClientRect().top;
      if (top > window.innerHeight - 120) detail.scrollIntoView({ block: 'start' });
    }

    renderAccess();

    return {
      root,
      title: 'Recipes · Nanofleet',
      select(id, version) {
        selected = { id: id || '', version: version || 0 };
        shown = null;
        delivery = null;
        revealed = false;
        clearDetail();
        for (const row of tbody.querySelectorAll('tr.selected')) {
          row.classList.remove('selected');
          setAttr(row, 'aria-selected', 'false');
        }
      },
      async refresh(isCurrent) {
        renderAccess();
        if (!can(RECIPE_ROLES)) return;
        const sel = selected;
        const base = sel.id ? `api/recipes/${encodeURIComponent(sel.id)}` : null;
        const versionReq = base
          ? api(`${base}?version=${sel.version}`).catch((err) => {
            if (err instanceof HttpError && err.status === 404) return { missing: err.message };
            throw err;
          })
          : null;
        // With a version number the deliveries need not wait for the version itself.
        const deliveriesReq = base && sel.version ? api(`${base}/deliveries?version=${sel.version}`) : null;
        const query = status ? `?status=${encodeURIComponent(status)}` : '';
        const [fleet, list, v, listed] = await Promise.all([api('api/fleet'), api(`api/recipes${query}`), versionReq, deliveriesReq]);
        let deliveries = listed;
        if (v && !v.missing && !deliveries) deliveries = await api(`${base}/deliveries?version=${v.version}`);
        if (!isCurrent()) return;
        rememberSites(fleet);
        shown = v && !v.missing ? v : null;
        const versions = (Array.isArray(list.recipes) ? list.recipes : []).slice()
          .sort((a, b) => String(a.recipe_id).localeCompare(String(b.recipe_id), LOCALE) || b.version - a.version);
        renderList(versions);
        if (!base) renderNothingSelected();
        else if (!shown) renderMissing(v.missing);
        else {
          renderVersion(shown);
          renderDeliveries(shown, deliveries || {});
          reveal();
        }
      },
    };
  }

  // === Batches ===

  function batchHash(id) {
    return `#/batches/${encodeURIComponent(id)}`;
  }

  function dispositionBadge(d) {
    const label = (DISPOSITIONS.find(([v]) => v === d) || [d, d || 'unknown'])[1];
    return h('span', { class: `batch-disposition disposition-${d || 'unknown'}`, 'data-testid': 'batch-disposition' }, label);
  }

  function enumLabel(v, prefix) {
    return String(v || '').replace(prefix, '').replace(/_/g, ' ').toLowerCase();
  }

  function batchesView(route) {
    let selected = route.id || '';
    let disposition = '';
    const filter = h('select', {
      id: 'batch-disposition-filter',
      'data-testid': 'batch-disposition-filter',
      onchange: () => {
        disposition = filter.value;
        refreshNow();
      },
    }, [['', 'All'], ...DISPOSITIONS].map(([value, label]) => h('option', { value }, label)));
    const count = h('span', { class: 'count', 'data-testid': 'batch-count' });
    // Share of each disposition among the batches listed: one stacked bar.
    const bar = h('div', { class: 'disposition-bar', 'data-testid': 'batch-disposition-bar', role: 'img' });
    const legend = h('div', { class: 'disposition-legend' });
    const tbody = h('tbody');
    const roleNote = h('div');
    const listSection = h('div', null,
      h('section', { class: 'card batch-summary' }, bar, legend),
      h('div', { class: 'toolbar' }, h('label', { for: 'batch-disposition-filter' }, 'Disposition'), filter, count),
      h('div', { class: 'card table-wrap' },
        h('table', { class: 'grid', 'data-testid': 'batch-table' },
          h('thead', null, h('tr', null, BATCH_COLUMNS.map((name) => h('th', null, name)))),
          tbody)));
    const detail = h('section', { class: 'batch-detail', 'aria-label': 'Selected batch' });
    const root = h('div', { class: 'batches' },
      h('div', { class: 'page-title' }, h('h1', null, 'Batches'),
        h('span', { class: 'muted' }, 'Batch records signed by the devices that made them, and QA\'s release')),
      roleNote, listSection, detail);

    function renderAccess() {
      const role = state.me ? state.me.role : '';
      const may = can(BATCH_ROLES);
      listSection.hidden = !may;
      detail.hidden = !may;
      setChildren(roleNote, `${role}|${may}`, () => (may ? null
        : h('p', { class: 'card note', 'data-testid': 'batches-role-note' },
          `Batch records are read by operations, pharmacists, QA and auditors; your role (${ROLE_LABEL[role] || role}) has no access to them.`)));
    }

    function renderSummary(counts, total) {
      const parts = DISPOSITIONS.map(([d, label]) => [d, label, Number((counts || {})[d]) || 0]);
      setAttr(bar, 'aria-label', parts.map(([, label, n]) => `${label}: ${n}`).join(', '));
      setChildren(bar, parts.map(([, , n]) => n).join('|'), () => (total === 0
        ? h('div', { class: 'disposition-seg empty' })
        : parts.filter(([, , n]) => n > 0).map(([d, label, n]) => h('div', {
          class: `disposition-seg disposition-${d}`, style: `flex-grow:${n}`, title: `${label}: ${n}`,
        }))));
      setChildren(legend, parts.map(([, , n]) => n).join('|'), () => parts.map(([d, label, n]) => h('span', {
        class: 'legend-item', 'data-testid': `batch-count-${d}`, 'data-count': n,
      }, h('span', { class: `legend-swatch disposition-${d}` }), `${label} ${fmtNum(n)}`)));
    }

    function createRow(b) {
      const cells = BATCH_COLUMNS.map(() => h('td'));
      const row = h('tr', { class: 'link', 'data-testid': 'batch-row', 'data-batch-id': b.batch_id }, cells);
      row.addEventListener('click', (ev) => {
        if (ev.target.closest('a')) return;
        navigate(batchHash(b.batch_id));
      });
      row._cells = cells;
      return row;
    }

    function updateRow(row, b) {
      const [id, device, recipe, started, outcome, qc, disp, by] = row._cells;
      setClass(row, `link${b.batch_id === selected ? ' selected' : ''}`);
      setAttr(row, 'data-disposition', b.disposition);
      setChildren(id, b.batch_id, () => h('a', { class: 'id-link mono', href: batchHash(b.batch_id) }, b.batch_id));
      setChildren(device, b.device_id, () => h('a', { href: deviceHash(b.device_id) }, b.device_id));
      setText(recipe, `${b.recipe_id} v${b.recipe_version}`);
      setText(started, fmtUtc(b.started_unix_ms));
      setText(outcome, b.outcome);
      setChildren(qc, String(b.qc_passed), () => h('span', { class: b.qc_passed ? 'qc-pass' : 'qc-fail' }, b.qc_passed ? 'pass' : 'fail'));
      setChildren(disp, b.disposition, () => dispositionBadge(b.disposition));
      setText(by, (b.started_by || {}).printed_name || (b.started_by || {}).user_id || '—');
    }

    function renderList(list) {
      setText(count, `${fmtNum(list.length)} batch${list.length === 1 ? '' : 'es'}`);
      if (list.length === 0) {
        setChildren(tbody, `empty|${disposition}`, () => h('tr', null, h('td', { class: 'empty', colspan: BATCH_COLUMNS.length },
          disposition ? 'No batches with this disposition.'
            : ['No batches yet: a pharmacist starts a run with ', h('code', null, 'nanofleet runs start'), '.'])));
        return;
      }
      delete tbody.dataset.sig;
      reconcile(tbody, list, (b) => b.batch_id, createRow, updateRow);
    }

    function qcCard(r) {
      const qc = r.qc || [];
      const bound = (v) => (v == null ? '—' : fmtQty(v));
      return h('section', { class: 'card', 'data-testid': 'batch-qc' },
        h('div', { class: 'card-head' }, h('h2', null, 'QC against the release criteria')),
        qc.length === 0 ? h('div', { class: 'empty' }, 'No QC results: the run did not complete.')
          : h('table', { class: 'grid' },
            h('thead', null, h('tr', null, ['Attribute', 'Result', 'Min', 'Max', 'Verdict'].map((c) => h('th', null, c)))),
            h('tbody', null, qc.map((q) => h('tr', { 'data-testid': 'batch-qc-row', 'data-passed': String(!!q.passed) },
              h('td', null, QC_LABEL[q.attribute] || enumLabel(q.attribute, 'QUALITY_ATTRIBUTE_')),
              h('td', { class: 'num' }, `${q.value == null || q.value === 'NaN' ? 'not measured' : fmtQty(q.value)} ${q.unit || ''}`),
              h('td', { class: 'num' }, bound(q.min)),
              h('td', { class: 'num' }, bound(q.max)),
              h('td', null, h('span', { class: q.passed ? 'qc-pass' : 'qc-fail' }, q.passed ? 'pass' : 'FAIL')))))));
    }

    function phasesCard(r) {
      const phases = r.phases || [];
      return h('section', { class: 'card', 'data-testid': 'batch-phases' },
        h('div', { class: 'card-head' }, h('h2', null, 'Phases: setpoints and actuals')),
        h('table', { class: 'grid' },
          h('thead', null, h('tr', null, ['Phase', 'Start', 'Total flow set / actual (mL/min)', 'FRR set / actual', 'Flow CV', 'Temperature set / actual (°C)', 'Max pressure (mbar)']
            .map((c) => h('th', null, c)))),
          h('tbody', null, phases.map((p) => h('tr', null,
            h('td', null, enumLabel(p.phase, 'RUN_PHASE_')),
            h('td', null, fmtUtc(p.started_unix_ms)),
            h('td', { class: 'num' }, `${fmtQty(p.setpoint_total_flow_ml_min, 2)} / ${fmtQty(p.actual_total_flow_ml_min, 2)}`),
            h('td', { class: 'num' }, `${fmtQty(p.setpoint_flow_rate_ratio, 2)} / ${fmtQty(p.actual_flow_rate_ratio, 2)}`),
            h('td', { class: 'num' }, fmtQty(p.flow_cv, 3)),
            h('td', { class: 'num' }, `${fmtQty(p.setpoint_temperature_c, 1)} / ${fmtQty(p.actual_temperature_c, 1)}`),
            h('td', { class: 'num' }, fmtNum(p.max_pressure_mbar)))))));
    }

    function alarmsCard(r) {
      const alarms = r.alarms || [];
      return h('section', { class: 'card', 'data-testid': 'batch-alarms' },
        h('div', { class: 'card-head' }, h('h2', null, 'Alarms'), h('span', { class: 'muted' }, fmtNum(alarms.length))),
        alarms.length === 0 ? h('div', { class: 'empty' }, 'None during the run.')
          : h('ul', { class: 'alarm-list' }, alarms.map((a) => h('li', null,
            h('span', { class: 'mono' }, fmtUtc(a.time_unix_ms)), ' ', enumLabel(a.priority, 'ALARM_PRIORITY_'), ' — ', a.detail))));
    }

    function signaturesCard(b) {
      const s = b.summary || {};
      const r = b.record || {};
      const line = (testid, meaning, name, who, when, note) => h('li', { class: 'signature', 'data-testid': testid, 'data-meaning': meaning },
        h('span', { class: `sig-meaning meaning-${meaning}` }, meaning),
        h('div', { class: 'sig-main' },
          h('div', { class: 'sig-name' }, name),
          h('div', { class: 'sig-when' }, h('span', { class: 'sig-time' }, fmtUtc(when)), who ? h('span', { class: 'muted' }, ` · ${who}`) : null),
          note ? h('div', { class: 'sub' }, note) : null));
      const d = s.decision;
      return h('section', { class: 'card', 'data-testid': 'batch-signatures' },
        h('div', { class: 'card-head' }, h('h2', null, 'Electronic signatures'), h('span', { class: 'muted' }, '21 CFR Part 11')),
        h('ol', { class: 'signature-list' },
          (b.recipe_signatures || []).map((x) => line('batch-recipe-signature', x.meaning, x.printed_name, `user ${x.signer_id}`, x.signed_unix_ms,
            `recipe ${r.recipe_id} v${r.recipe_version}`)),
          line('batch-device-signature', 'recorded', `Device ${r.device_id}`, `certificate ${b.certificate_serial}`, r.ended_unix_ms,
            `record SHA-256 ${b.record_digest}`),
          d ? line('batch-decision', d.meaning, d.printed_name, `user ${d.signer_id}`, d.signed_unix_ms, d.reason || null) : null),
        d ? null : h('p', { class: 'sig-waiting' }, s.qc_passed ? 'Waiting for QA release.' : 'Failed: QA can only reject it.'),
        d || !can(BATCH_SIGN_ROLES) ? null : decisionForm(s));
    }

    // QA's electronic signature: the signed-in person's id and their password again.
    function decisionForm(s) {
      const me = state.me || {};
      const password = h('input', {
        id: 'batch-decision-password', type: 'password', autocomplete: 'current-password', 'data-testid': 'batch-decision-password',
      });
      const reason = h('input', {
        id: 'batch-decision-reason', type: 'text', 'data-testid': 'batch-decision-reason',
        placeholder: s.qc_passed ? 'Reason (required to reject)' : 'Reason for rejecting',
      });
      const error = h('p', { class: 'form-error', role: 'alert', 'data-testid': 'batch-decision-error', hidden: true });
      const buttons = [];
      async function sign(meaning) {
        error.hidden = true;
        for (const b of buttons) b.disabled = true;
        try {
          await api(`api/batches/${encodeURIComponent(s.batch_id)}/decision`, {
            method: 'POST',
            body: { meaning, reason: reason.value, user_id: me.id, password: password.value },
            timeoutMs: LOGIN_TIMEOUT_MS,
          });
          password.value = '';
          refreshNow();
        } catch (err) {
          setText(error, sentence(err.message));
          error.hidden = false;
          for (const b of buttons) b.disabled = b.dataset.testid === 'batch-release' && !s.qc_passed;
        }
      }
      const release = h('button', {
        type: 'button', class: 'btn btn-primary', 'data-testid': 'batch-release', disabled: !s.qc_passed,
        onclick: () => sign('released'),
      }, 'Release');
      const reject = h('button', { type: 'button', class: 'btn', 'data-testid': 'batch-reject', onclick: () => sign('rejected') }, 'Reject');
      buttons.push(release, reject);
      return h('div', { class: 'batch-decision', 'data-testid': 'batch-decision-form' },
        h('p', { class: 'sub' }, `Sign as ${me.display_name || me.id} (${me.id}): enter your password again. The signature binds your name, the time and its meaning to this record.`),
        h('label', { for: 'batch-decision-password' }, 'Password'), password,
        h('label', { for: 'batch-decision-reason' }, 'Reason'), reason,
        error,
        h('div', { class: 'batch-decision-buttons' }, release, ' ', reject));
    }

    function renderDetail(b) {
      const s = b.summary || {};
      const r = b.record || {};
      const c = r.cartridge || {};
      const by = r.started_by || {};
      setAttr(detail, 'data-testid', 'batch-detail');
      setAttr(detail, 'data-batch-id', s.batch_id);
      setChildren(detail, `${s.batch_id}|${s.disposition}`, () => [
        h('section', { class: 'card recipe-head' },
          h('div', { class: 'recipe-title' },
            h('h2', null, h('span', { class: 'mono' }, s.batch_id)), dispositionBadge(s.disposition),
            h('span', { class: 'recipe-name' }, `${s.outcome}${r.abort_reason ? `: ${r.abort_reason}` : ''}`)),
          h('dl', { class: 'facts' },
            spec('Recipe', h('a', { href: `#/recipes/${encodeURIComponent(r.recipe_id)}/${r.recipe_version}` }, `${r.recipe_id} v${r.recipe_version}`)),
            spec('Device', h('a', { href: deviceHash(r.device_id) }, r.device_id), null, `${r.model}, firmware ${r.firmware_version}`),
            spec('Cartridge', `lot ${c.lot || '—'}`, null, `serial ${c.serial || '—'} · expires ${fmtUtc(c.expires_unix_ms)}`),
            spec('Prescription', r.prescription_id || '—', null, `dated ${fmtUtc(r.prescription_unix_ms)} · patient ${r.patient_pseudonym}`),
            spec('Started by', by.printed_name || by.user_id || '—', null, fmtUtc(r.started_unix_ms)),
            spec('Ended', fmtUtc(r.ended_unix_ms))),
          h('p', { class: 'batch-links' },
            h('a', { class: 'btn', href: `batches/${encodeURIComponent(s.batch_id)}/record.html`, target: '_blank', rel: 'noopener', 'data-testid': 'batch-print' }, 'Printable record'),
            ' ',
            h('a', { class: 'btn', href: `batches/${encodeURIComponent(s.batch_id)}/record.json`, 'data-testid': 'batch-json' }, 'Signed record (JSON)'))),
        h('div', { class: 'recipe-status-grid' }, qcCard(r), signaturesCard(b)),
        phasesCard(r),
        alarmsCard(r),
      ]);
    }

    renderAccess();
    return {
      root,
      title: 'Batches · Nanofleet',
      select(id) {
        selected = id || '';
        detail.replaceChildren();
        delete detail.dataset.sig;
      },
      async refresh(isCurrent) {
        renderAccess();
        if (!can(BATCH_ROLES)) return;
        const sel = selected;
        const query = disposition ? `?disposition=${encodeURIComponent(disposition)}` : '';
        const one = sel ? api(`api/batches/${encodeURIComponent(sel)}`).catch((err) => {
          if (err instanceof HttpError && err.status === 404) return { missing: err.message };
          throw err;
        }) : null;
        const [all, list, b] = await Promise.all([api('api/batches'), disposition ? api(`api/batches${query}`) : null, one]);
        if (!isCurrent()) return;
        const shown = list || all;
        const total = (all.batches || []).length;
        renderSummary(all.counts, total);
        renderList(Array.isArray(shown.batches) ? shown.batches : []);
        if (!sel) {
          setChildren(detail, 'hint', () => h('p', { class: 'card note', 'data-testid': 'batch-hint' },
            'Select a batch to see its QC results, phases, alarms and signatures, and to print its record.'));
        } else if (b && b.missing) {
          setChildren(detail, `missing|${sel}`, () => h('section', { class: 'card notice', 'data-testid': 'batch-missing' },
            h('h1', null, `Batch ${sel} not found`), h('p', { class: 'muted' }, sentence(b.missing)),
            h('p', null, h('a', { href: '#/batches' }, 'Back to all batches'))));
        } else if (b) {
          renderDetail(b);
        }
      },
    };
  }

  // === Unknown route ===

  function unknownView(route) {
    const root = h('section', { class: 'card notice' },
      h('h1', null, 'Page not found'),
      h('p', { class: 'muted' }, `There is no page at ${route.path || 'this address'}.`),
      h('p', null, h('a', { href: '#/' }, 'Go to the fleet overview')));
    return { root, title: 'Not found · Nanofleet', async refresh() {} };
  }

  // === Start ===

  function start() {
    el.view = document.getElementById('view');
    el.banner = document.querySelector('[data-testid="error-banner"]');
    el.bannerTitle = el.banner.querySelector('.banner-title');
    el.bannerDetail = el.banner.querySelector('.banner-detail');
    el.live = document.querySelector('[data-testid="live-status"]');
    el.liveText = el.live.querySelector('.live-text');
    el.nav = document.querySelector('.mainnav');
    el.enrollNav = el.nav.querySelector('[data-nav="enroll"]');
    el.recipesNav = el.nav.querySelector('[data-nav="recipes"]');
    el.batchesNav = el.nav.querySelector('[data-nav="batches"]');
    el.session = document.querySelector('.session');
    el.whoami = el.session.querySelector('[data-testid="whoami"]');
    el.whoamiName = el.whoami.querySelector('.whoami-name');
    el.whoamiRole = el.whoami.querySelector('.whoami-role');
    el.logout = el.session.querySelector('[data-testid="logout"]');
    el.login = document.getElementById('login');
    el.loginNote = el.login.querySelector('.login-note');
    el.loginForm = el.login.querySelector('[data-testid="login-form"]');
    el.loginUser = document.getElementById('login-user');
    el.loginPassword = document.getElementById('login-password');
    el.loginError = document.getElementById('login-error');
    el.loginSubmit = el.login.querySelector('[data-testid="login-submit"]');
    el.loginForm.addEventListener('submit', submitLogin);
    el.logout.addEventListener('click', signOut);
    // Hidden until the server says who is signed in, so a signed-out visitor sees the
    // sign-in form rather than an empty console flashing by.
    el.view.hidden = true;
    window.addEventListener('hashchange', onRoute);
    onRoute();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
