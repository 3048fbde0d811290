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
//   #/quality?metric=M&by=F&window=W&site=&device=&firmware=&recipe=&lot=
//                      quality: fleet health by site, the control chart of a metric (or one
//                      small chart per device, site, ... with `by`), which level differs, and
//                      the cohort gate; every picker is in the address, so Back undoes it
//   #/alerts[/ID][?site=S] monitoring alerts by state; ID selected: its evidence (the chart's
//                      points and limits, the test's result) and the acknowledgement
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
  const ROLLOUT_ROLES = new Set(['ops', 'qa', 'auditor']);
  // A device's path through an update, in order; the colours of the wave bars follow it.
  const ROLLOUT_STATUSES = ['committed', 'verifying', 'rebooting', 'installing', 'deferred', 'downloaded',
    'downloading', 'offered', 'pending', 'rolled-back', 'failed', 'refused', 'timed-out', 'cancelled'];
  const ROLLOUT_FAILURES = new Set(['rolled-back', 'failed', 'refused', 'timed-out']);
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
  // Quality: charts and comparisons change at the pace of batches (a minute or so), so
  // they are fetched less often than the views poll; a change of picker fetches at once.
  const QUALITY_CHART_MS = 5000;
  const QUALITY_COMPARE_MS = 15_000;
  const ALERT_BADGE_MS = 10_000;
  // Points per chart: enough to read a trend, few enough to draw and hover quickly.
  const CHART_POINTS = 300;
  const SMALL_CHART_POINTS = 120;
  const CPK_TARGET = 1.33;
  const DEFAULT_METRIC = 'pdi';
  const QUALITY_PARAMS = ['metric', 'by', 'window', 'site', 'device', 'firmware', 'recipe', 'lot'];
  // [code, label, unit, group]: the server's metric names.
  const METRICS = [
    ['size_nm', 'Size (Z-average)', 'nm', 'quality'], ['pdi', 'Polydispersity (PDI)', '', 'quality'],
    ['encapsulation_pct', 'Encapsulation', '%', 'quality'], ['ph', 'pH', '', 'quality'], ['yield_pct', 'Yield', '%', 'quality'],
    ['flow_cv', 'Flow CV', '', 'process'], ['max_pressure_mbar', 'Max pressure', 'mbar', 'process'],
    ['frr_error_pct', 'FRR error', '%', 'process'], ['alarms', 'Alarms per run', '', 'process'],
  ];
  const FACTORS = [['device', 'Device'], ['site', 'Site'], ['firmware', 'Firmware'], ['recipe', 'Recipe'], ['lot', 'Cartridge lot']];
  const WINDOWS = [['', 'All batches', 0], ['24h', 'Last 24 hours', 86_400_000], ['7d', 'Last 7 days', 604_800_000]];
  // AcknowledgeAlert in the server's access table; everyone signed in reads alerts.
  const ALERT_ACK_ROLES = new Set(['ops', 'qa']);
  const ALERT_STATES = [['active', 'Active'], ['open', 'Open'], ['acknowledged', 'Acknowledged'], ['resolved', 'Resolved'], ['all', 'All']];
  const ALERT_KIND_LABEL = {
    ALERT_KIND_SPC_RULE: 'Control chart', ALERT_KIND_DEVICE_SILENT: 'Device silent',
    ALERT_KIND_ALARM_STORM: 'Alarm storm', ALERT_KIND_SITE_DIFFERS: 'Site differs',
  };
  const ALERT_COLUMNS = ['State', 'Kind', 'Alert', 'Site', 'Raised', 'Last seen', 'Seen'];

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
    rolloutsNav: null,
    alertsNav: null,
    alertsBadge: null,
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
        pollAlertBadge();
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
    if (parts[0] === 'quality' && parts.length === 1) return { name: 'quality', params: Object.fromEntries(params) };
    if (parts[0] === 'rollouts' && parts.length <= 2) return { name: 'rollouts', id: parts[1] || '' };
    if (parts[0] === 'inventory' && parts.length === 1) return { name: 'inventory' };
    if (parts[0] === 'alerts' && parts.length <= 2) return { name: 'alerts', id: parts[1] || '', site: params.get('site') || '' };
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
    // Pickers and drill-downs change the address (so Back works) but keep the page.
    if (prev && prev.name === 'quality' && route.name === 'quality' && state.view && state.view.setParams) {
      state.view.setParams(route.params);
      refreshNow();
      return;
    }
    if (prev && prev.name === 'alerts' && route.name === 'alerts' && state.view && state.view.select) {
      state.view.select(route.id, route.site);
      refreshNow();
      return;
    }
    if (prev && prev.name === 'rollouts' && route.name === 'rollouts' && state.view && state.view.select) {
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
      batches: batchesView, quality: qualityView, alerts: alertsView, rollouts: rolloutsView,
      inventory: inventoryView,
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
    el.rolloutsNav.hidden = !can(ROLLOUT_ROLES);
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
    const history = seriesCard(deviceId);

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
        h('div', { class: 'chart-box' }, canvas, chartNote)),
      history.node);

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
        await history.refresh(isCurrent);
      },
    };
  }

  // === Telemetry history: one metric from the rollups ===

  const SERIES_METRICS = [
    ['total_flow', 'Total flow (µL/min)'], ['flow_ratio', 'Flow-rate ratio'],
    ['aqueous_flow', 'Aqueous flow (µL/min)'], ['ethanol_flow', 'Ethanol flow (µL/min)'],
    ['aqueous_pressure', 'Aqueous pressure (mbar)'], ['ethanol_pressure', 'Ethanol pressure (mbar)'],
    ['mixer_pressure_drop', 'Mixer pressure drop (mbar)'],
    ['chamber_temperature', 'Chamber temperature (°C)'], ['cartridge_temperature', 'Cartridge temperature (°C)'],
  ];
  const SERIES_WINDOWS = [['1h', 3600e3], ['24h', 86400e3], ['7d', 7 * 86400e3], ['30d', 30 * 86400e3]];
  /** The history refreshes at most this often (it reads rollups, not the live stream). */
  const SERIES_EVERY_MS = 10000;

  /**
   * A card with one metric of a device over a window: per bucket, the min–max range as
   * a band, the median as a line and the 90th percentile dashed; hovering a bucket names
   * its figures.
   */
  function seriesCard(deviceId) {
    const state = { metric: 'total_flow', windowMs: 86400e3, fetched: 0, key: '' };
    const metricSel = h('select', { 'data-testid': 'series-metric', 'aria-label': 'Metric',
      onchange: (e) => { state.metric = e.target.value; state.fetched = 0; } },
    SERIES_METRICS.map(([v, label]) => h('option', { value: v, selected: v === state.metric }, label)));
    const windowSel = h('select', { 'data-testid': 'series-window', 'aria-label': 'Window',
      onchange: (e) => { state.windowMs = Number(e.target.value); state.fetched = 0; } },
    SERIES_WINDOWS.map(([label, ms]) => h('option', { value: ms, selected: ms === state.windowMs }, `last ${label}`)));
    const meta = h('span', { class: 'muted', 'data-testid': 'series-meta' });
    const box = h('div', { class: 'chart-box series-box' });
    const legend = h('div', { class: 'legend' },
      h('span', { style: `color: ${SPC.value}` }, h('i'), 'Median'),
      h('span', { style: `color: ${SPC.limit}` }, h('i', { class: 'dashed' }), '90th percentile'),
      h('span', { style: 'color: #9cc0ea' }, h('i', { class: 'band' }), 'Min – max'));
    const node = h('section', { class: 'card chart-card', 'data-testid': 'series-card' },
      h('div', { class: 'card-head' }, h('h2', null, 'History'), metricSel, windowSel, meta, legend), box);

    function draw(res) {
      const pts = (res.points || []).filter((p) => Number.isFinite(p.start_unix_ms));
      const width = Math.max(320, box.clientWidth - 24 || 900);
      const height = 260;
      const left = 64; const right = 16; const top = 12; const bottom = 28;
      const now = serverNow();
      const x0 = now - state.windowMs; const x1 = now;
      const X = (t) => left + ((t - x0) / (x1 - x0)) * (width - left - right);
      const svg = sv('svg', { width, height, viewBox: `0 0 ${width} ${height}`, class: 'series-chart',
        'data-testid': 'series-chart', 'data-points': pts.length, role: 'img',
        'aria-label': `${res.metric} of ${deviceId}, ${pts.length} points` });
      if (pts.length === 0) {
        box.replaceChildren(svg, h('div', { class: 'chart-note' }, 'No samples of this metric in the window.'));
        return;
      }
      let lo = Math.min(...pts.map((p) => p.min)); let hi = Math.max(...pts.map((p) => p.max));
      if (!(hi > lo)) { hi = lo + Math.max(1, Math.abs(lo) * 0.01); lo -= (hi - lo) / 2; }
      const pad = (hi - lo) * 0.06; lo -= pad; hi += pad;
      const Y = (v) => top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom);
      for (let i = 0; i <= 4; i++) {
        const v = lo + ((hi - lo) * i) / 4;
        svg.append(hline(left, width - right, Y(v), { stroke: CHART.grid }),
          sv('text', { x: left - 6, y: Y(v) + 4, class: 'spc-tick', 'text-anchor': 'end' }, fmtQty(v, 4)));
      }
      for (let i = 0; i <= 4; i++) {
        const t = x0 + ((x1 - x0) * i) / 4;
        const label = state.windowMs > 86400e3 ? fmtDateTime(t).slice(0, 10) : fmtClock(t);
        svg.append(sv('text', { x: X(t), y: height - 8, class: 'spc-tick', 'text-anchor': 'middle' }, label));
      }
      const mid = (p) => p.start_unix_ms + (p.width_ms || 0) / 2;
      const band = pts.map((p) => `${X(mid(p)).toFixed(1)},${Y(p.max).toFixed(1)}`)
        .concat(pts.slice().reverse().map((p) => `${X(mid(p)).toFixed(1)},${Y(p.min).toFixed(1)}`));
      svg.append(sv('polygon', { points: band.join(' '), fill: '#9cc0ea', 'fill-opacity': 0.45, stroke: 'none' }));
      svg.append(polyline(pts.map((p) => [X(mid(p)), Y(p.p90)]), { stroke: SPC.limit, 'stroke-width': 1.2, 'stroke-dasharray': '4 3' }));
      svg.append(polyline(pts.map((p) => [X(mid(p)), Y(p.p50)]), { stroke: SPC.value, 'stroke-width': 1.6, 'data-testid': 'series-median' }));
      const slot = Math.max(2, (width - left - right) / Math.max(pts.length, 1));
      for (const p of pts) {
        const tip = `${fmtDateTime(p.start_unix_ms)}${p.width_ms ? ` + ${fmtDuration(p.width_ms)}` : ''}\n`
          + `${fmtNum(p.count)} samples · min ${fmtQty(p.min, 4)} · median ${fmtQty(p.p50, 4)} · mean ${fmtQty(p.mean, 4)}`
          + ` · p90 ${fmtQty(p.p90, 4)} · p99 ${fmtQty(p.p99, 4)} · max ${fmtQty(p.max, 4)}`;
        svg.append(sv('rect', { x: X(mid(p)) - slot / 2, y: top, width: slot, height: height - top - bottom,
          fill: 'transparent', class: 'series-hit' }, sv('title', { text: tip })));
      }
      box.replaceChildren(svg);
    }

    return {
      node,
      async refresh(isCurrent) {
        const key = `${state.metric}|${state.windowMs}`;
        if (key === state.key && Date.now() - state.fetched < SERIES_EVERY_MS) return;
        const since = Math.floor(serverNow() - state.windowMs);
        const res = await api(`api/devices/${encodeURIComponent(deviceId)}/series?metric=${state.metric}&since_ms=${since}&points=240`);
        if (!isCurrent()) return;
        state.key = key;
        state.fetched = Date.now();
        const res_ = RESOLUTIONS[res.resolution] || res.resolution;
        setText(meta, `${res_}${res.bucket_ms ? ` · ${fmtDuration(res.bucket_ms)} buckets` : ''} · ${res.unit || ''}`);
        draw(res);
      },
    };
  }

  const RESOLUTIONS = { raw: 'raw samples', minute: 'minute rollups', hour: 'hour rollups' };

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

  // === Quality: shared helpers ===

  /**
   * A number from the server's proto3 JSON, where 64-bit integers come as strings and
   * NaN and infinities as "NaN" / "Infinity"; null when it is not a finite number.
   */
  function num(v) {
    if (v == null || v === '') return null;
    const n = typeof v === 'number' ? v : Number(v);
    return Number.isFinite(n) ? n : null;
  }

  function metricInfo(code) {
    const m = METRICS.find(([c]) => c === code);
    return m ? { code, label: m[1], unit: m[2], group: m[3] } : { code, label: code || '—', unit: '', group: '' };
  }

  /** "PDI", "Size (nm)": a metric with its unit, for axis titles and headings. */
  function metricTitle(code) {
    const m = metricInfo(code);
    return m.unit ? `${m.label} (${m.unit})` : m.label;
  }

  function factorLabel(f) {
    return (FACTORS.find(([c]) => c === f) || [f, f || '—'])[1];
  }

  /** A level of a factor as people read it: sites by name, the rest as they are. */
  function levelText(factor, level) {
    return factor === 'site' ? siteName(level) : level;
  }

  /** Decimals that show a metric's variation: three significant digits of 3σ. */
  function digitsFor(spread) {
    if (!(spread > 0)) return 2;
    return Math.min(4, Math.max(0, 1 - Math.floor(Math.log10(spread))));
  }

  function fmtP(p) {
    const v = num(p);
    if (v == null) return '—';
    if (v < 0.001) return '< 0.001';
    return fmtNum(v, v < 0.01 ? 3 : 2);
  }

  function fmtPct(share, digits = 0) {
    const v = num(share);
    return v == null ? '—' : `${fmtNum(100 * v, digits)} %`;
  }

  function fmtSigned(v, digits) {
    const n = num(v);
    if (n == null) return '—';
    const s = fmtNum(Math.abs(n), digits);
    return Number(s.replace(/[^\d.]/g, '')) === 0 ? s : `${n < 0 ? '−' : '+'}${s}`;
  }

  /** Axis labels: the time alone today, the day and time otherwise. */
  function fmtShortTime(ms) {
    if (!hasTime(ms)) return '';
    const d = new Date(ms);
    const time = d.toLocaleTimeString(LOCALE, { hour12: false, hour: '2-digit', minute: '2-digit' });
    if (d.toDateString() === new Date(serverNow()).toDateString()) return time;
    return `${d.toLocaleDateString(LOCALE, { day: 'numeric', month: 'short' })} ${time}`;
  }

  /** "site=st-marys-london" → ['site', 'st-marys-london']; "" is the whole selection. */
  function parseStratum(stratum) {
    const s = String(stratum || '');
    const eq = s.indexOf('=');
    return eq < 0 ? ['', s] : [s.slice(0, eq), s.slice(eq + 1)];
  }

  function capital(text) {
    const s = String(text || '');
    return s.charAt(0).toUpperCase() + s.slice(1);
  }

  function ruleChip(code, description) {
    return h('span', { class: 'rule-chip', title: description || null }, code);
  }

  function qualityHash(params) {
    const q = new URLSearchParams();
    for (const key of QUALITY_PARAMS) {
      const v = params[key];
      if (v && !(key === 'metric' && v === DEFAULT_METRIC)) q.set(key, v);
    }
    const s = q.toString();
    return s ? `#/quality?${s}` : '#/quality';
  }

  function alertHash(id, site) {
    const q = site ? `?site=${encodeURIComponent(site)}` : '';
    return id ? `#/alerts/${encodeURIComponent(id)}${q}` : `#/alerts${q}`;
  }

  /**
   * Fetches on a schedule of its own: again when its key (the question asked) changes or
   * when `maxAgeMs` has passed, otherwise keeps the last answer. Views poll every second;
   * the quality answers change at the pace of batches, a minute or so.
   */
  function slot(maxAgeMs) {
    return {
      key: null,
      at: 0,
      value: null,
      due(key) {
        return key !== this.key || Date.now() - this.at >= maxAgeMs;
      },
      keep(key, value) {
        this.key = key;
        this.at = Date.now();
        this.value = value;
      },
      clear() {
        this.key = null;
      },
    };
  }

  /** A 4xx answer to a question the data cannot answer yet is shown in place, not as a failure. */
  function answerOrRefusal(promise) {
    return promise.catch((err) => {
      if (err instanceof HttpError && err.status >= 400 && err.status < 500 && err.status !== 401 && err.status !== 403) {
        return { refused: capital(sentence(err.message)) };
      }
      throw err;
    });
  }

  // === Quality: SVG charts ===

  const SVG_NS = 'http://www.w3.org/2000/svg';

  /** h() for SVG elements. */
  function sv(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v == null || v === false) continue;
        if (k === 'text') node.textContent = v;
        else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? '' : String(v));
      }
    }
    append(node, children);
    return node;
  }

  const SPC = {
    value: '#1b63b5',
    center: '#1d8a45',
    limit: '#d9731a',
    spec: '#7a4fb3',
    signal: '#c62828',
    zone: '#d5dbe3',
    baseline: '#f0f5fc',
    cplus: '#1b63b5',
    cminus: '#0f8b8d',
  };

  function polyline(points, attrs) {
    let d = '';
    let open = false;
    for (const [x, y] of points) {
      if (x == null || y == null || !Number.isFinite(y)) {
        open = false;
        continue;
      }
      d += `${open ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`;
      open = true;
    }
    return sv('path', { d: d || 'M0,0', fill: 'none', 'stroke-linejoin': 'round', ...attrs });
  }

  function hline(x0, x1, y, attrs) {
    const py = Math.round(y) + 0.5;
    return sv('line', { x1: x0, x2: x1, y1: py, y2: py, ...attrs });
  }

  /** Right-margin labels of the horizontal lines, nudged apart so none overlap. */
  function sideLabels(list, x, minY, maxY) {
    const sorted = list.filter((l) => Number.isFinite(l.y)).sort((a, b) => a.y - b.y);
    for (let i = 1; i < sorted.length; i++) sorted[i].y = Math.max(sorted[i].y, sorted[i - 1].y + 12);
    for (let i = sorted.length - 1; i >= 0; i--) {
      const limit = i === sorted.length - 1 ? maxY : sorted[i + 1].y - 12;
      sorted[i].y = Math.min(sorted[i].y, limit);
    }
    return sorted.map((l) => sv('text', {
      x, y: Math.max(minY, l.y) + 4, class: 'spc-side', fill: l.color, 'data-testid': l.testid || null,
    }, l.text));
  }

  function yScale(top, height, lo, hi) {
    return (v) => top + height - ((v - lo) / (hi - lo)) * height;
  }

  function domainOf(values, pad = 0.08) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of values) {
      if (v == null || !Number.isFinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    if (!Number.isFinite(lo)) return { lo: 0, hi: 1 };
    if (hi - lo < 1e-12) {
      const d = Math.abs(hi) * 0.1 || 1;
      return { lo: lo - d, hi: hi + d };
    }
    const p = (hi - lo) * pad;
    return { lo: lo - p, hi: hi + p };
  }

  function gridAndTicks(g, left, plotW, top, height, lo, hi, targetTicks, digits, showLabels) {
    const y = yScale(top, height, lo, hi);
    const step = niceStep(hi - lo, targetTicks);
    const tickDigits = Math.max(stepDigits(step), 0);
    for (let v = Math.ceil(lo / step) * step; v <= hi + step / 1e6; v += step) {
      const py = y(v);
      g.append(hline(left, left + plotW, py, { stroke: CHART.grid }));
      if (showLabels) {
        g.append(sv('text', { x: left - 8, y: py + 4, class: 'spc-tick', 'text-anchor': 'end' },
          fmtNum(Math.abs(v) < step / 1e6 ? 0 : v, Math.min(tickDigits, digits + 1))));
      }
    }
    g.append(sv('line', { x1: left + 0.5, x2: left + 0.5, y1: top, y2: top + height, stroke: CHART.axis }));
    return y;
  }

  function panelTitle(g, x, y, text, note) {
    g.append(sv('text', { x, y, class: 'spc-panel-title' }, text, note ? sv('tspan', { class: 'spc-panel-note', dx: 8 }, note) : null));
  }

  /** What a point's tooltip says: the batch, where it was made, its value and the rules it completes. */
  function pointTitle(p, metric, digits, ruleText, extra) {
    const rules = (p.rules || []).map((r) => `  ${r}: ${ruleText(r)}`);
    const where = [p.device_id, p.site_id ? siteName(p.site_id) : null, p.firmware_version ? `firmware ${p.firmware_version}` : null,
      p.cartridge_lot ? `lot ${p.cartridge_lot}` : null].filter(Boolean).join(' · ');
    const m = metricInfo(metric);
    return [
      `Batch ${p.batch_id} (#${fmtNum(num(p.index) + 1)})`,
      where,
      `Ended ${fmtDateTime(num(p.ended_unix_ms))}`,
      `${m.label}: ${fmtNum(num(p.value), digits)}${m.unit ? ` ${m.unit}` : ''}`,
      ...(rules.length ? ['Rules fired:', ...rules] : ['No rule fired']),
      extra,
    ].filter(Boolean).join('\n');
  }

  /**
   * A Shewhart individuals chart of `chart` as SVG, `width` pixels wide: the values in
   * batch order, the centre line and the 3σ control limits (and the recipe's release
   * limits, dashed, when they are known), points that complete a rule in red. The full
   * chart adds ±1σ/±2σ zones, the baseline, an EWMA panel and a CUSUM panel below;
   * the compact one (small multiples, alert evidence) is the individuals panel alone.
   *
   *   opts.compact     small multiple: no EWMA/CUSUM, fewer labels
   *   opts.height      individuals panel height
   *   opts.onPoint     clicking a point (full chart)
   *   opts.ruleText    rule code → description
   *   opts.highlight   a rule code whose points are ringed (alert evidence)
   */
  function controlChartSvg(chart, width, opts = {}) {
    const compact = !!opts.compact;
    const pts = chart.points || [];
    const n = pts.length;
    const ruleText = opts.ruleText || (() => '');
    const center = num(chart.center);
    const ucl = num(chart.ucl);
    const lcl = num(chart.lcl);
    const sigma = num(chart.sigma);
    const lsl = num(chart.lsl);
    const usl = num(chart.usl);
    const digits = digitsFor(3 * (sigma || 0) || Math.abs(center || 0) / 10);
    const values = pts.map((p) => num(p.value));

    const left = compact ? 52 : 76;
    const right = compact ? 14 : 92;
    const plotW = Math.max(60, width - left - right);
    const iTop = compact ? 8 : 22;
    const iH = opts.height || (compact ? 108 : 250);
    const panelGap = 34;
    const subH = 92;
    const ewmaTop = iTop + iH + panelGap;
    const cusumTop = ewmaTop + subH + panelGap;
    const bottom = compact ? iTop + iH : cusumTop + subH;
    const height = bottom + (compact ? 8 : 34);
    const inset = Math.min(10, plotW / 20);
    const x = (i) => left + inset + (n <= 1 ? (plotW - 2 * inset) / 2 : (i / (n - 1)) * (plotW - 2 * inset));

    const svg = sv('svg', {
      class: `spc${compact ? ' spc-compact' : ''}`, width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
      'data-testid': compact ? 'small-chart-svg' : 'control-chart', 'data-points': n,
      'data-signals': pts.filter((p) => (p.rules || []).length).length,
      'aria-label': `${metricInfo(chart.metric).label} control chart of ${n} batches`,
    });
    const defs = sv('defs', null, sv('clipPath', { id: `clip-${opts.id || 'i'}` }, sv('rect', { x: left, y: iTop - 4, width: plotW, height: iH + 8 })));
    svg.append(defs);

    // --- Individuals panel ---
    let { lo, hi } = domainOf([...values, ucl, lcl, center], compact ? 0.1 : 0.08);
    // Release limits far outside the control limits would squash the data into a thin
    // band; such a limit is named at the edge instead of drawn.
    const span = hi - lo;
    const offScale = [];
    for (const [name, v] of [['LSL', lsl], ['USL', usl]]) {
      if (v == null) continue;
      if (v >= lo - span * 0.75 && v <= hi + span * 0.75) {
        lo = Math.min(lo, v - span * 0.04);
        hi = Math.max(hi, v + span * 0.04);
      } else offScale.push([name, v]);
    }
    const gI = sv('g', { class: 'spc-panel' });
    svg.append(gI);
    const y = gridAndTicks(gI, left, plotW, iTop, iH, lo, hi, compact ? 3 : 5, digits, !compact);

    // The baseline: the first points, from which the centre and limits come.
    const baseN = num(chart.baseline_points) || 0;
    const firstIndex = n ? num(pts[0].index) : 0;
    if (!compact && n > 1 && baseN > firstIndex) {
      const lastBase = Math.min(n - 1, baseN - 1 - firstIndex);
      const x0 = left + 1;
      const x1 = Math.min(left + plotW, (x(lastBase) + x(Math.min(n - 1, lastBase + 1))) / 2);
      gI.append(sv('rect', { x: x0, y: iTop, width: Math.max(0, x1 - x0), height: iH, fill: SPC.baseline, 'data-testid': 'chart-baseline' }),
        sv('line', { x1: x0, x2: x1, y1: iTop - 4.5, y2: iTop - 4.5, stroke: '#9fb6d3', 'stroke-width': 3 }),
        sv('text', { x: x0 + 2, y: iTop - 9, class: 'spc-zone-label' }, `baseline: the first ${fmtNum(baseN)} batches set the limits`));
    }
    if (!compact && sigma > 0 && center != null) {
      for (const k of [-2, -1, 1, 2]) {
        gI.append(hline(left, left + plotW, y(center + k * sigma), { stroke: SPC.zone, 'stroke-dasharray': '2 4' }));
      }
    }
    const labels = [];
    const limitLine = (v, color, testid, text, dash) => {
      if (v == null) return;
      gI.append(hline(left, left + plotW, y(v), {
        stroke: color, 'stroke-width': dash ? 1.4 : 1.6, 'stroke-dasharray': dash ? '6 4' : null, 'data-testid': testid,
      }));
      labels.push({ y: y(v), color, text: compact ? text : `${text} ${fmtNum(v, digits)}`, testid: `${testid}-label` });
    };
    limitLine(ucl, SPC.limit, 'limit-ucl', 'UCL');
    limitLine(center, SPC.center, 'limit-center', 'CL');
    limitLine(lcl, SPC.limit, 'limit-lcl', 'LCL');
    if (!offScale.some(([k]) => k === 'USL')) limitLine(usl, SPC.spec, 'limit-usl', 'USL', true);
    if (!offScale.some(([k]) => k === 'LSL')) limitLine(lsl, SPC.spec, 'limit-lsl', 'LSL', true);
    if (compact) {
      // Left of the axis there is room for the limits' values, which is what a small chart needs.
      for (const l of [[ucl, SPC.limit], [center, SPC.center], [lcl, SPC.limit]]) {
        if (l[0] != null) gI.append(sv('text', { x: left - 6, y: y(l[0]) + 4, class: 'spc-tick', 'text-anchor': 'end', fill: l[1] }, fmtNum(l[0], digits)));
      }
    } else {
      gI.append(...sideLabels(labels, left + plotW + 8, iTop + 4, iTop + iH));
      for (const [name, v] of offScale) {
        gI.append(sv('text', {
          x: left + plotW - 4, y: name === 'USL' ? iTop + 12 : iTop + iH - 6, class: 'spc-side', 'text-anchor': 'end', fill: SPC.spec,
        }, `${name} ${fmtNum(v, digits)} ${name === 'USL' ? '↑' : '↓'} off scale`));
      }
      // Axis title along the left edge.
      gI.append(sv('text', { class: 'spc-axis-title', transform: `translate(16 ${iTop + iH / 2}) rotate(-90)`, 'text-anchor': 'middle' },
        metricTitle(chart.metric)));
    }

    const series = sv('g', { 'clip-path': `url(#clip-${opts.id || 'i'})` });
    gI.append(series);
    series.append(polyline(values.map((v, i) => [x(i), v == null ? null : y(v)]), {
      stroke: SPC.value, 'stroke-width': compact ? 1.2 : 1.5, 'stroke-opacity': 0.85,
    }));
    const dense = n > 150;
    // Each point owns the strip of the chart around it (up to 14 px each side) for hover and click.
    const half = n > 1 ? Math.min(14, Math.max(2, (x(1) - x(0)) / 2)) : 14;
    const pointLayer = sv('g', { class: 'spc-points' });
    gI.append(pointLayer);
    pts.forEach((p, i) => {
      const v = values[i];
      if (v == null) return;
      const rules = p.rules || [];
      const signal = rules.length > 0;
      const ringed = opts.highlight && rules.includes(opts.highlight);
      const cx = x(i);
      const cy = Math.min(iTop + iH + 4, Math.max(iTop - 4, y(v)));
      if (compact && !opts.onPoint) {
        pointLayer.append(sv('circle', {
          cx, cy, r: signal ? 3 : 1.7, class: signal ? 'pt signal' : 'pt', 'data-testid': signal ? 'small-signal' : null,
        }, signal ? sv('title', null, pointTitle(p, chart.metric, digits, ruleText)) : null));
        return;
      }
      const g = sv('g', {
        class: `qpt${signal ? ' signal' : ''}`, 'data-testid': 'chart-point', 'data-batch-id': p.batch_id,
        'data-rules': rules.join(' ') || null, tabindex: opts.onPoint ? 0 : null, role: opts.onPoint ? 'link' : null,
      });
      g.append(
        sv('rect', { class: 'qpt-hit', x: Math.max(left + 1, cx - half), y: iTop, width: Math.min(left + plotW, cx + half) - Math.max(left + 1, cx - half), height: iH }),
        ringed ? sv('circle', { class: 'pt-ring', cx, cy, r: 8 }) : null,
        sv('circle', { class: signal ? 'pt signal' : 'pt', cx, cy, r: signal ? (dense ? 3.5 : 4.5) : (dense ? 2.2 : 3.2) }),
        sv('title', null, pointTitle(p, chart.metric, digits, ruleText, opts.onPoint ? 'Click to open the batch record.' : null)));
      if (opts.onPoint) {
        g.addEventListener('click', () => opts.onPoint(p));
        g.addEventListener('keydown', (ev) => {
          if (ev.key === 'Enter') opts.onPoint(p);
        });
      }
      pointLayer.append(g);
    });
    // Signals drawn last so that no neighbour's dot covers them.
    for (const g of Array.from(pointLayer.querySelectorAll('.signal'))) pointLayer.append(g.closest('g.qpt') || g);

    if (compact) return svg;

    // --- EWMA panel ---
    const gE = sv('g', { class: 'spc-panel' });
    svg.append(gE);
    const ew = pts.map((p) => num(p.ewma));
    const ewU = pts.map((p) => num(p.ewma_ucl));
    const ewL = pts.map((p) => num(p.ewma_lcl));
    const dE = domainOf([...ew, ...ewU, ...ewL, center], 0.12);
    const yE = gridAndTicks(gE, left, plotW, ewmaTop, subH, dE.lo, dE.hi, 4, digits, true);
    panelTitle(gE, left, ewmaTop - 8, 'EWMA', `λ = ${fmtQty(chart.ewma_lambda, 2)}, limits ±${fmtQty(chart.ewma_l, 2)}σ: catches small sustained shifts`);
    if (center != null) gE.append(hline(left, left + plotW, yE(center), { stroke: SPC.center, 'stroke-width': 1.2 }));
    gE.append(
      polyline(ewU.map((v, i) => [x(i), v == null ? null : yE(v)]), { stroke: SPC.limit, 'stroke-width': 1.3, 'data-testid': 'ewma-ucl' }),
      polyline(ewL.map((v, i) => [x(i), v == null ? null : yE(v)]), { stroke: SPC.limit, 'stroke-width': 1.3 }),
      polyline(ew.map((v, i) => [x(i), v == null ? null : yE(v)]), { stroke: SPC.value, 'stroke-width': 1.8, 'data-testid': 'ewma-line' }));
    ew.forEach((v, i) => {
      if (v == null) return;
      if ((ewU[i] != null && v > ewU[i]) || (ewL[i] != null && v < ewL[i])) {
        gE.append(sv('circle', { cx: x(i), cy: yE(v), r: 2.8, class: 'pt signal' }));
      }
    });
    gE.append(...sideLabels([
      { y: yE(ewU[n - 1]), color: SPC.limit, text: 'UCL' },
      { y: yE(ew[n - 1]), color: SPC.value, text: 'EWMA' },
      { y: yE(ewL[n - 1]), color: SPC.limit, text: 'LCL' },
    ].filter((l) => Number.isFinite(l.y)), left + plotW + 8, ewmaTop + 4, ewmaTop + subH));

    // --- CUSUM panel: C⁺ upwards, C⁻ mirrored downwards, against ±H ---
    const gC = sv('g', { class: 'spc-panel' });
    svg.append(gC);
    const H = (num(chart.cusum_h) || 0) * (sigma || 0);
    const up = pts.map((p) => num(p.cusum_upper));
    const down = pts.map((p) => { const v = num(p.cusum_lower); return v == null ? null : -v; });
    const reach = Math.max(H, ...up.filter((v) => v != null), ...down.filter((v) => v != null).map((v) => -v)) * 1.12 || 1;
    const yC = gridAndTicks(gC, left, plotW, cusumTop, subH, -reach, reach, 4, digits, true);
    panelTitle(gC, left, cusumTop - 8, 'CUSUM', `C⁺ above, C⁻ below, decision interval H = ${fmtQty(chart.cusum_h, 2)}σ`);
    gC.append(hline(left, left + plotW, yC(0), { stroke: CHART.axis }));
    if (H > 0) {
      gC.append(hline(left, left + plotW, yC(H), { stroke: SPC.limit, 'stroke-width': 1.3, 'data-testid': 'cusum-h' }),
        hline(left, left + plotW, yC(-H), { stroke: SPC.limit, 'stroke-width': 1.3 }));
    }
    gC.append(
      polyline(up.map((v, i) => [x(i), v == null ? null : yC(v)]), { stroke: SPC.cplus, 'stroke-width': 1.8, 'data-testid': 'cusum-upper' }),
      polyline(down.map((v, i) => [x(i), v == null ? null : yC(v)]), { stroke: SPC.cminus, 'stroke-width': 1.8, 'data-testid': 'cusum-lower' }));
    pts.forEach((p, i) => {
      if (H > 0 && up[i] != null && up[i] > H) gC.append(sv('circle', { cx: x(i), cy: yC(up[i]), r: 2.8, class: 'pt signal' }));
      if (H > 0 && down[i] != null && -down[i] > H) gC.append(sv('circle', { cx: x(i), cy: yC(down[i]), r: 2.8, class: 'pt signal' }));
    });
    gC.append(...sideLabels([
      { y: yC(H), color: SPC.limit, text: '+H' },
      { y: yC(-H), color: SPC.limit, text: '−H' },
      { y: yC(up[n - 1]) - 0.1, color: SPC.cplus, text: 'C⁺' },
      { y: yC(down[n - 1]) + 0.1, color: SPC.cminus, text: 'C⁻' },
    ].filter((l) => Number.isFinite(l.y) && (H > 0 || !l.text.includes('H'))), left + plotW + 8, cusumTop + 4, cusumTop + subH));

    // --- Batch axis: when the runs ended, at a few points ---
    const axisY = bottom;
    const ticks = Math.max(2, Math.min(n, Math.floor(plotW / 130)));
    const seen = new Set();
    for (let k = 0; k < ticks && n > 0; k++) {
      const i = n === 1 ? 0 : Math.round((k * (n - 1)) / (ticks - 1));
      if (seen.has(i)) continue;
      seen.add(i);
      const px = Math.round(x(i)) + 0.5;
      for (const [top, hgt] of [[iTop, iH], [ewmaTop, subH], [cusumTop, subH]]) {
        svg.insertBefore(sv('line', { x1: px, x2: px, y1: top, y2: top + hgt, stroke: CHART.grid }), gI);
      }
      svg.append(sv('line', { x1: px, x2: px, y1: axisY, y2: axisY + 4, stroke: CHART.axis }),
        sv('text', { x: px, y: axisY + 17, class: 'spc-tick', 'text-anchor': k === 0 ? 'start' : k === ticks - 1 ? 'end' : 'middle' },
          `#${fmtNum(num(pts[i].index) + 1)} · ${fmtShortTime(num(pts[i].ended_unix_ms))}`));
    }
    svg.append(sv('text', { x: left - 8, y: axisY + 17, class: 'spc-tick', 'text-anchor': 'end' }, 'batch'));
    return svg;
  }

  /** The effect of a level with its 95 % interval, on a scale shared by the table's rows. */
  function intervalBar(s, scale, significant) {
    const W = 170;
    const H = 20;
    const mid = W / 2;
    const px = (v) => mid + (v / scale) * (W / 2 - 6);
    const lo = num(s.ci_low);
    const hi = num(s.ci_high);
    const eff = num(s.effect);
    const color = significant ? SPC.limit : '#7d8b99';
    return sv('svg', { class: 'ci-bar', width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `effect ${fmtQty(eff, 4)}, 95 % interval ${fmtQty(lo, 4)} to ${fmtQty(hi, 4)}` },
      sv('line', { x1: mid + 0.5, x2: mid + 0.5, y1: 1, y2: H - 1, stroke: CHART.axis, 'stroke-dasharray': '2 2' }),
      lo != null && hi != null ? sv('line', { x1: px(lo), x2: px(hi), y1: H / 2, y2: H / 2, stroke: color, 'stroke-width': 3, 'stroke-linecap': 'round', 'stroke-opacity': 0.55 }) : null,
      eff != null ? sv('circle', { cx: px(eff), cy: H / 2, r: 4, fill: color }) : null);
  }

  // === Quality page ===

  function qualityParams(raw) {
    const p = {};
    for (const key of QUALITY_PARAMS) p[key] = (raw && raw[key]) || '';
    if (!METRICS.some(([c]) => c === p.metric)) p.metric = DEFAULT_METRIC;
    if (p.by && !FACTORS.some(([c]) => c === p.by)) p.by = '';
    if (!WINDOWS.some(([c]) => c === p.window)) p.window = '';
    return p;
  }

  function windowSince(win) {
    const w = WINDOWS.find(([c]) => c === win);
    return w && w[2] ? Math.floor(serverNow() - w[2]) : 0;
  }

  function qualityView(route) {
    let p = qualityParams(route.params);
    // What each part of the page last fetched: health every second like other views,
    // the chart every few seconds, the comparisons every 15 s.
    const healthSlot = slot(POLL_MS);
    const devicesSlot = slot(POLL_MS);
    const chartSlot = slot(QUALITY_CHART_MS);
    const compareSlot = slot(QUALITY_COMPARE_MS);
    const gateSlot = slot(QUALITY_COMPARE_MS);
    const levelsSlot = slot(QUALITY_COMPARE_MS);
    // The levels of the compared factor: with fewer than two there is nothing to ask.
    const compareLevelsSlot = slot(QUALITY_COMPARE_MS);
    let compareBy = p.by || 'device';
    // The gate's choices live here rather than in the address: they are a question asked
    // beside the chart, not a view of it.
    const gate = { factor: 'firmware', a: '', b: '' };
    let lastCharts = null;

    // --- Fleet health ---
    const healthBody = h('tbody');
    const healthMeta = h('span', { class: 'muted' });
    const siteDevices = h('div', { class: 'site-devices', hidden: true, 'data-testid': 'site-devices' });
    const healthSection = h('section', { class: 'section' },
      h('div', { class: 'section-head' }, h('h2', null, 'Fleet health'), healthMeta),
      h('div', { class: 'card' },
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid health-table', 'data-testid': 'health-table' },
          h('thead', null, h('tr', null,
            h('th', null, 'Site'), h('th', null, 'QC pass rate'), h('th', { class: 'num' }, 'Passed / batches'),
            h('th', null, 'Devices online'), h('th', { class: 'num', title: 'Open and acknowledged alerts' }, 'Active alerts'))),
          healthBody)),
        siteDevices));

    // --- Pickers ---
    const metricSelect = h('select', { id: 'quality-metric', 'data-testid': 'quality-metric' },
      [['quality', 'Quality attributes'], ['process', 'Process signals']].map(([group, label]) => h('optgroup', { label },
        METRICS.filter((m) => m[3] === group).map(([code, name, unit]) => h('option', { value: code }, unit ? `${name} (${unit})` : name)))));
    const bySelect = h('select', { id: 'quality-by', 'data-testid': 'quality-by' },
      h('option', { value: '' }, 'None: one chart'), FACTORS.map(([code, label]) => h('option', { value: code }, label)));
    const windowSelect = h('select', { id: 'quality-window', 'data-testid': 'quality-window' },
      WINDOWS.map(([code, label]) => h('option', { value: code }, label)));
    const go = (changes) => navigate(qualityHash({ ...p, ...changes }));
    metricSelect.addEventListener('change', () => go({ metric: metricSelect.value }));
    bySelect.addEventListener('change', () => go({ by: bySelect.value }));
    windowSelect.addEventListener('change', () => go({ window: windowSelect.value }));
    const scope = h('div', { class: 'scope', 'data-testid': 'quality-scope' });
    const controls = h('section', { class: 'card quality-controls' },
      h('div', { class: 'control-row' },
        field(metricSelect, 'Metric'), field(bySelect, 'Split by'), field(windowSelect, 'Batches')),
      scope);

    // --- The chart ---
    const chartTitle = h('h2');
    const chartMeta = h('span', { class: 'muted' });
    const legend = h('div', { class: 'legend spc-legend' });
    const chartArea = h('div', { class: 'spc-area' });
    const side = h('aside', { class: 'spc-side-panel', 'data-testid': 'chart-side' });
    const chartBody = h('div', { class: 'spc-layout' }, chartArea, side);
    const chartCard = h('section', { class: 'card chart-card spc-card', 'data-testid': 'quality-chart' },
      h('div', { class: 'card-head' }, h('div', { class: 'spc-heading' }, chartTitle, chartMeta), legend),
      chartBody);

    // --- Which level differs ---
    const compareSelect = h('select', { id: 'compare-by', 'data-testid': 'compare-by' },
      FACTORS.map(([code, label]) => h('option', { value: code }, label.toLowerCase())));
    compareSelect.addEventListener('change', () => {
      compareBy = compareSelect.value;
      compareSlot.clear();
      compareLevelsSlot.clear();
      refreshNow();
    });
    const compareMetric = h('span');
    const compareBody = h('div', { class: 'compare-body' });
    const compareCard = h('section', { class: 'card', 'data-testid': 'compare-card' },
      h('div', { class: 'card-head' },
        h('h2', { class: 'inline-pick' }, 'Which ', compareSelect, ' differs?'),
        h('span', { class: 'muted' }, 'in ', compareMetric, ', adjusted for the other factors')),
      compareBody);

    // --- Cohort gate ---
    const gateFactor = h('select', { id: 'gate-factor', 'data-testid': 'gate-factor' },
      FACTORS.map(([code, label]) => h('option', { value: code, selected: code === gate.factor }, label)));
    const gateA = h('select', { id: 'gate-a', 'data-testid': 'gate-a' });
    const gateB = h('select', { id: 'gate-b', 'data-testid': 'gate-b' });
    gateFactor.addEventListener('change', () => {
      gate.factor = gateFactor.value;
      gate.a = '';
      gate.b = '';
      levelsSlot.clear();
      gateSlot.clear();
      refreshNow();
    });
    for (const [sel, key] of [[gateA, 'a'], [gateB, 'b']]) {
      sel.addEventListener('change', () => {
        gate[key] = sel.value;
        gateSlot.clear();
        refreshNow();
      });
    }
    const gateBody = h('div', { class: 'gate-body' });
    const gateCard = h('section', { class: 'card', 'data-testid': 'gate-card' },
      h('div', { class: 'card-head' }, h('h2', null, 'Cohort gate'),
        h('span', { class: 'muted' }, 'Does cohort A perform worse than cohort B?')),
      h('div', { class: 'card-body control-row' },
        field(gateFactor, 'Factor'), field(gateA, 'Cohort A (under test)'), field(gateB, 'Cohort B (reference)')),
      gateBody);

    const root = h('div', { class: 'quality' },
      h('div', { class: 'page-title' }, h('h1', null, 'Quality'),
        h('span', { class: 'muted' }, 'Continued process verification: every batch of the fleet on control charts')),
      healthSection,
      h('section', { class: 'section' },
        h('div', { class: 'section-head' }, h('h2', null, 'Control chart')),
        controls, chartCard),
      h('section', { class: 'section' },
        h('div', { class: 'section-head' }, h('h2', null, 'Comparisons'),
          h('span', { class: 'muted' }, 'Refreshed every 15 s and when a choice changes')),
        h('div', { class: 'compare-grid' }, compareCard, gateCard)));

    function renderPickers() {
      if (metricSelect.value !== p.metric) metricSelect.value = p.metric;
      if (bySelect.value !== p.by) bySelect.value = p.by;
      if (windowSelect.value !== p.window) windowSelect.value = p.window;
      if (compareSelect.value !== compareBy) compareSelect.value = compareBy;
      setText(compareMetric, metricInfo(p.metric).label);
      const chips = [];
      if (p.site) chips.push(['site', `Site: ${siteName(p.site)}`]);
      if (p.device) chips.push(['device', `Device: ${p.device}`]);
      for (const f of ['firmware', 'recipe', 'lot']) if (p[f]) chips.push([f, `${factorLabel(f)}: ${p[f]}`]);
      setChildren(scope, JSON.stringify(chips), () => [
        h('span', { class: 'scope-label' }, 'Batches from'),
        chips.length === 0 ? h('span', { class: 'scope-all' }, 'the whole fleet')
          : chips.map(([key, text]) => h('span', { class: 'scope-chip', 'data-testid': 'scope-chip', 'data-factor': key }, text,
            h('a', {
              href: qualityHash({ ...p, [key]: '', ...(key === 'site' ? { device: '' } : {}) }),
              class: 'scope-remove', title: 'Remove this filter', 'aria-label': `Remove ${text}`,
            }, '×'))),
        chips.length > 1 ? h('a', { class: 'scope-clear', href: qualityHash({ metric: p.metric, by: p.by, window: p.window }) }, 'Whole fleet') : null,
      ]);
    }

    // --- Fleet health ---

    function meter(share, cls, testid) {
      const v = num(share);
      return h('span', { class: 'meter-cell' },
        h('span', { class: 'meter', 'data-testid': testid },
          h('span', { class: `meter-fill ${cls}`, style: `width:${v == null ? 0 : Math.max(0, Math.min(100, 100 * v))}%` })),
        h('span', { class: 'meter-text' }, v == null ? 'no batches' : fmtPct(v)));
    }

    function passClass(rate) {
      return rate >= 0.95 ? 'ok' : rate >= 0.8 ? 'warn' : 'bad';
    }

    function createHealthRow(s) {
      const cells = Array.from({ length: 5 }, (_, i) => h('td', { class: i === 2 || i === 4 ? 'num' : i === 0 ? 'site' : null }));
      const row = h('tr', { class: 'link', 'data-testid': 'health-row', 'data-site-id': s.site_id }, cells);
      row.addEventListener('click', (ev) => {
        if (ev.target.closest('a')) return;
        // A second click on the selected site goes back to the whole fleet.
        if (p.site === s.site_id) go({ site: '', device: '' });
        else go({ site: s.site_id, device: '', by: p.by === 'site' || !p.by ? 'device' : p.by });
      });
      row._cells = cells;
      return row;
    }

    function updateHealthRow(row, s) {
      const [site, pass, batches, online, alerts] = row._cells;
      const n = num(s.batches) || 0;
      const passed = num(s.batches_passed) || 0;
      const rate = n ? passed / n : null;
      const devices = num(s.devices) || 0;
      const up = num(s.devices_online) || 0;
      const open = num(s.open_alerts) || 0;
      setClass(row, `link${s.site_id === p.site ? ' selected' : ''}`);
      setAttr(row, 'data-pass-rate', rate == null ? null : rate.toFixed(3));
      setChildren(site, `${s.site_id}|${s.site_name}`, () => [
        h('a', { href: qualityHash({ ...p, site: s.site_id, device: '', by: p.by === 'site' || !p.by ? 'device' : p.by }) }, s.site_name || s.site_id),
        s.site_name && s.site_name !== s.site_id ? h('span', { class: 'sub mono' }, s.site_id) : null]);
      setChildren(pass, `${n}|${passed}`, () => meter(rate, rate == null ? '' : passClass(rate), 'pass-meter'));
      setAttr(pass, 'title', n ? `${passed} of ${n} batches passed QC` : 'No batches in this window');
      setText(batches, n ? `${fmtNum(passed)} / ${fmtNum(n)}` : '0');
      setChildren(online, `${devices}|${up}`, () => [
        meter(devices ? up / devices : null, devices && up === devices ? 'ok' : up === 0 ? 'bad' : 'warn', 'uptime-meter'),
        h('span', { class: 'sub' }, `${fmtNum(up)} of ${fmtNum(devices)} device${devices === 1 ? '' : 's'}`)]);
      setChildren(alerts, String(open), () => (open
        ? h('a', { class: 'count-badge attention', href: alertHash('', s.site_id), 'data-testid': 'site-open-alerts' }, fmtNum(open))
        : h('span', { class: 'muted' }, '0')));
    }

    function renderHealth(res) {
      const sites = Array.isArray(res.sites) ? res.sites : [];
      for (const s of sites) {
        if (!state.sites.has(s.site_id) && s.site_name) state.sites.set(s.site_id, { id: s.site_id, name: s.site_name });
      }
      const windowLabel = (WINDOWS.find(([c]) => c === p.window) || WINDOWS[0])[1].toLowerCase();
      setText(healthMeta, sites.length ? `worst first · QC pass rate over ${windowLabel} · click a site to see its devices` : '');
      if (sites.length === 0) {
        setChildren(healthBody, 'empty', () => h('tr', null, h('td', { class: 'empty', colspan: 5 }, 'No sites yet.')));
        return;
      }
      delete healthBody.dataset.sig;
      reconcile(healthBody, sites, (s) => s.site_id, createHealthRow, updateHealthRow);
    }

    function renderSiteDevices(devs) {
      siteDevices.hidden = !p.site;
      if (!p.site || !devs) return;
      const list = (devs.devices || []).slice().sort(byId);
      setChildren(siteDevices, `${p.site}|${p.device}|${list.map((d) => `${d.id}:${d.online}`).join(',')}`, () => [
        h('span', { class: 'site-devices-label' }, `Devices at ${siteName(p.site)}`),
        list.length === 0 ? h('span', { class: 'muted' }, 'none registered')
          : list.map((d) => h('a', {
            class: `device-chip${d.id === p.device ? ' selected' : ''}`, href: qualityHash({ ...p, device: d.id, by: p.by === 'device' ? '' : p.by }),
            'data-testid': 'site-device', 'data-device-id': d.id, title: `${d.id}: its own control chart`,
          }, h('span', { class: d.online ? 'dot on' : 'dot' }), d.id)),
      ]);
    }

    // --- Chart ---

    function selectionQuery(except) {
      const q = new URLSearchParams();
      for (const f of ['site', 'device', 'firmware', 'recipe', 'lot']) if (p[f] && f !== except) q.set(f, p[f]);
      const since = windowSince(p.window);
      if (since) q.set('since_ms', since);
      return q;
    }

    function chartKey() {
      const q = selectionQuery(null);
      q.delete('since_ms');
      return `${p.metric}|${p.by}|${p.window}|${q}`;
    }

    function chartWidth(el, fallback) {
      const w = Math.floor(el.getBoundingClientRect().width);
      return w > 100 ? w : fallback;
    }

    function ruleTextOf(chart) {
      const map = new Map((chart.rule_counts || []).map((r) => [r.rule, r.description]));
      for (const v of chart.violations || []) if (!map.has(v.rule)) map.set(v.rule, v.description);
      return (code) => map.get(code) || '';
    }

    function signalCount(chart) {
      return (chart.rule_counts || []).reduce((sum, r) => sum + (num(r.count) || 0), 0);
    }

    function scopeText() {
      if (p.device) return p.device;
      const parts = [];
      if (p.site) parts.push(siteName(p.site));
      for (const f of ['firmware', 'recipe', 'lot']) if (p[f]) parts.push(`${factorLabel(f).toLowerCase()} ${p[f]}`);
      return parts.length ? parts.join(' · ') : 'whole fleet';
    }

    function renderLegend(chart, split) {
      const spec = chart && (num(chart.lsl) != null || num(chart.usl) != null);
      setChildren(legend, `${split}|${spec}`, () => [
        h('span', { style: `color:${SPC.value}` }, h('i', { class: 'dotline' }), 'Batch'),
        h('span', { style: `color:${SPC.signal}` }, h('i', { class: 'dotonly' }), 'Rule fired'),
        h('span', { style: `color:${SPC.center}` }, h('i'), 'Centre'),
        h('span', { style: `color:${SPC.limit}` }, h('i'), 'Control limits ±3σ'),
        spec ? h('span', { style: `color:${SPC.spec}` }, h('i', { class: 'dashed' }), 'Release limits') : null,
        split ? null : h('span', { style: 'color:#9fb6d3' }, h('i', { class: 'block' }), 'Baseline'),
      ]);
    }

    function emptyNote(text, testid = 'chart-note') {
      return h('div', { class: 'spc-empty', 'data-testid': testid }, text);
    }

    /** Why a chart with batches has no limits, in words for the page. */
    function problemText(chart) {
      const n = num(chart.n) || 0;
      if (n === 1) return 'One batch so far: control limits need at least two.';
      return `No chart yet: ${sentence(chart.problem || 'no points to draw')}`;
    }

    function noBatchesText() {
      return p.window || p.site || p.device || p.firmware || p.recipe || p.lot
        ? 'No batches in this selection yet. Widen the window or remove a filter.'
        : 'No batches yet: the charts fill in as devices finish runs and send their signed records.';
    }

    function renderSingle(chart) {
      chartBody.classList.remove('split');
      side.hidden = false;
      const m = metricInfo(p.metric);
      setText(chartTitle, `${m.label} · ${scopeText()}`);
      const n = num(chart.n) || 0;
      const shown = (chart.points || []).length;
      setText(chartMeta, n
        ? `${fmtNum(n)} batch${n === 1 ? '' : 'es'}${shown < n ? `, newest ${fmtNum(shown)} shown` : ''} · limits from the first ${fmtNum(num(chart.baseline_points))}`
        : '');
      renderLegend(chart, false);
      const width = chartWidth(chartArea, 900);
      const last = (chart.points || [])[shown - 1];
      const sig = [width, chartKey(), n, shown, last && last.batch_id, chart.center, chart.ucl, chart.problem, signalCount(chart)].join('|');
      setChildren(chartArea, sig, () => {
        if (n === 0) return emptyNote(noBatchesText());
        if (chart.problem || shown === 0) return emptyNote(problemText(chart));
        return controlChartSvg(chart, width, {
          id: 'main', ruleText: ruleTextOf(chart), onPoint: (pt) => navigate(batchHash(pt.batch_id)),
        });
      });
      setChildren(side, `${sig}`, () => sidePanel(chart));
    }

    function sidePanel(chart) {
      const n = num(chart.n) || 0;
      if (n === 0 || chart.problem) return h('div', { class: 'muted spc-side-empty' }, 'Capability and rules appear with the chart.');
      const sigma = num(chart.sigma);
      const digits = digitsFor(3 * (sigma || 0));
      const cpk = num(chart.cpk);
      const cp = num(chart.cp);
      const lsl = num(chart.lsl);
      const usl = num(chart.usl);
      const cpkClass = cpk == null ? '' : cpk >= CPK_TARGET ? 'ok' : cpk >= 1 ? 'warn' : 'bad';
      const counts = (chart.rule_counts || []).slice().sort((a, b) => (num(b.count) || 0) - (num(a.count) || 0));
      const unit = metricInfo(chart.metric).unit;
      const ewmaAt = num(chart.first_ewma_signal);
      const cusumAt = num(chart.first_cusum_signal);
      return [
        h('div', { class: 'side-block' },
          h('div', { class: 'side-title' }, 'Capability'),
          cpk == null
            ? h('p', { class: 'muted side-note' }, lsl == null && usl == null
              ? 'No release limits: capability needs a selection of one recipe with limits on this metric.'
              : 'Not computable for this selection.')
            : [
              h('div', { class: `cpk ${cpkClass}`, 'data-testid': 'cpk' },
                h('span', { class: 'cpk-label' }, 'Cpk'), h('span', { class: 'cpk-value' }, fmtNum(cpk, 2)),
                h('span', { class: 'cpk-target' }, cpk >= CPK_TARGET ? `meets ${CPK_TARGET}` : `below ${CPK_TARGET}`)),
              h('div', { class: 'cpk-scale', title: `Cpk ${fmtNum(cpk, 2)} against the target ${CPK_TARGET}` },
                h('span', { class: `cpk-fill ${cpkClass}`, style: `width:${Math.min(100, (100 * Math.max(0, cpk)) / 2)}%` }),
                h('span', { class: 'cpk-mark', style: `left:${(100 * CPK_TARGET) / 2}%` })),
              h('div', { class: 'cpk-axis' }, h('span', null, '0'), h('span', null, '1.33'), h('span', null, '2')),
            ],
          h('dl', { class: 'side-facts' },
            cp != null ? spec('Cp', fmtNum(cp, 2)) : null,
            lsl != null || usl != null ? spec('Release limits', lsl != null && usl != null ? `${fmtNum(lsl, digits)} to ${fmtNum(usl, digits)}`
              : lsl != null ? `at least ${fmtNum(lsl, digits)}` : `at most ${fmtNum(usl, digits)}`, unit) : null,
            spec('Mean ± sd', `${fmtNum(num(chart.mean), digits)} ± ${fmtNum(num(chart.sd), digits)}`, unit),
            spec('Centre, σ', `${fmtNum(num(chart.center), digits)}, ${fmtNum(sigma, digits)}`, unit))),
        h('div', { class: 'side-block' },
          h('div', { class: 'side-title' }, 'Rules fired', h('span', { class: 'muted' }, ` over all ${fmtNum(n)} batches`)),
          counts.length === 0
            ? h('p', { class: 'side-note in-control' }, h('span', { class: 'dot on' }), 'None: the process is in control.')
            : h('ul', { class: 'rule-counts', 'data-testid': 'rule-counts' }, counts.map((r) => h('li', { 'data-rule': r.rule },
              ruleChip(r.rule), h('span', { class: 'rule-desc' }, r.description), h('span', { class: 'rule-count' }, fmtNum(num(r.count)))))),
          ewmaAt != null || cusumAt != null
            ? h('p', { class: 'side-note' }, [
              ewmaAt != null ? `EWMA first signalled at batch #${fmtNum(ewmaAt + 1)}` : null,
              cusumAt != null ? `CUSUM at #${fmtNum(cusumAt + 1)}` : null].filter(Boolean).join(' · '), '.')
            : null),
      ];
    }

    function renderSplit(charts) {
      chartBody.classList.add('split');
      side.hidden = true;
      setText(chartTitle, `${metricInfo(p.metric).label} by ${factorLabel(p.by).toLowerCase()} · ${scopeText()}`);
      const drawn = charts.filter((c) => (num(c.n) || 0) > 0);
      setText(chartMeta, drawn.length
        ? `${fmtNum(drawn.length)} chart${drawn.length === 1 ? '' : 's'}, each against its own baseline · most signals first · click one to open it`
        : '');
      renderLegend(null, true);
      if (drawn.length === 0) {
        setChildren(chartArea, `empty|${chartKey()}`, () => emptyNote(noBatchesText()));
        return;
      }
      let grid = chartArea.querySelector('.small-multiples');
      if (!grid) {
        delete chartArea.dataset.sig;
        grid = h('div', { class: 'small-multiples', 'data-testid': 'small-multiples' });
        chartArea.replaceChildren(grid);
      }
      const sorted = drawn.slice().sort((a, b) => signalCount(b) - signalCount(a)
        || Number(Boolean(a.problem)) - Number(Boolean(b.problem))
        || parseStratum(a.stratum)[1].localeCompare(parseStratum(b.stratum)[1], LOCALE, { numeric: true }));
      reconcile(grid, sorted, (c) => c.stratum, createSmall, updateSmall);
      // New cards are measured once they are in the page, so they draw at their width.
      if (sorted.some((c) => !grid.querySelector(`[data-key="${CSS.escape(c.stratum)}"] svg, [data-key="${CSS.escape(c.stratum)}"] .spc-empty`))) {
        reconcile(grid, sorted, (c) => c.stratum, createSmall, updateSmall);
      }
    }

    function createSmall(c) {
      const [factor, level] = parseStratum(c.stratum);
      const name = h('span', { class: 'small-name' });
      const meta = h('span', { class: 'small-meta' });
      const badge = h('span', { class: 'small-badge' });
      const plot = h('div', { class: 'small-plot' });
      const drill = () => go({ [factor]: level, by: factor === 'site' ? 'device' : '' });
      const card = h('article', {
        class: 'small-chart', 'data-testid': 'small-chart', 'data-stratum': c.stratum, tabindex: 0, role: 'link',
        title: `Open the chart of ${levelText(factor, level)}`,
        onclick: drill,
        onkeydown: (ev) => {
          if (ev.key === 'Enter') drill();
        },
      }, h('div', { class: 'small-head' }, name, badge), meta, plot);
      card._parts = { name, meta, badge, plot, factor, level };
      return card;
    }

    function updateSmall(card, c) {
      const pp = card._parts;
      const n = num(c.n) || 0;
      const signals = signalCount(c);
      const cpk = num(c.cpk);
      setText(pp.name, levelText(pp.factor, pp.level) || '—');
      setChildren(pp.meta, `${n}|${cpk}`, () => [`${fmtNum(n)} batch${n === 1 ? '' : 'es'}`,
        cpk != null ? [' · ', h('span', { class: cpk < CPK_TARGET ? 'cpk-low' : null, title: `capability against the release limits; target ${CPK_TARGET}` }, `Cpk ${fmtNum(cpk, 2)}`)] : null]);
      setText(pp.badge, c.problem ? 'no limits yet' : signals ? `${fmtNum(signals)} signal${signals === 1 ? '' : 's'}` : 'in control');
      setClass(pp.badge, `small-badge ${c.problem ? 'none' : signals ? 'attention' : 'calm'}`);
      setAttr(card, 'data-signals', signals);
      if (!card.isConnected) return;
      const width = chartWidth(pp.plot, 320);
      const shown = (c.points || []).length;
      const last = (c.points || [])[shown - 1];
      setChildren(pp.plot, [width, chartKey(), n, shown, last && last.batch_id, c.center, c.problem, signals].join('|'), () => {
        if (c.problem || shown === 0) return h('div', { class: 'spc-empty small', 'data-testid': 'small-chart-note' }, problemText(c));
        return controlChartSvg(c, width, { compact: true, id: `s-${c.stratum.replace(/[^A-Za-z0-9_-]/g, '_')}`, ruleText: ruleTextOf(c) });
      });
    }

    function renderCharts(res) {
      const charts = Array.isArray(res.charts) ? res.charts : [];
      lastCharts = res;
      if (p.by) renderSplit(charts);
      else renderSingle(charts[0] || { n: 0, points: [] });
    }

    // --- Which level differs ---

    function compareKey() {
      const q = selectionQuery(compareBy);
      q.delete('since_ms');
      return `${p.metric}|${compareBy}|${p.window}|${q}`;
    }

    function fewLevelsNote(factor, levels) {
      const what = factorLabel(factor).toLowerCase();
      return levels.length === 0
        ? `No batches yet, so no ${what} to compare.`
        : `All batches so far share one ${what} (${levelText(factor, levels[0])}): there is nothing to compare it with. Pick another factor.`;
    }

    function renderCompare(res, levels) {
      if (levels && levels.length < 2) {
        setChildren(compareBody, `few|${compareBy}|${levels.length}`, () => h('p', { class: 'panel-note', 'data-testid': 'compare-note' }, fewLevelsNote(compareBy, levels)));
        return;
      }
      if (!res) return;
      if (res.refused) {
        setChildren(compareBody, `refused|${res.refused}`, () => h('p', { class: 'panel-note', 'data-testid': 'compare-note' }, res.refused));
        return;
      }
      const strata = Array.isArray(res.strata) ? res.strata : [];
      const digits = digitsFor(3 * (num(res.residual_sigma) || 0));
      const scale = Math.max(1e-12, ...strata.flatMap((s) => [num(s.ci_low), num(s.ci_high), num(s.effect)]).filter((v) => v != null).map(Math.abs));
      const adjusted = (res.adjusted_for || []).map((f) => factorLabel(enumValue(f, 'FACTOR_').toLowerCase()).toLowerCase());
      const sig = JSON.stringify([res.n, res.f_statistic, res.summary, strata.map((s) => [s.level, s.n, s.effect, s.p_value])]);
      setChildren(compareBody, sig, () => [
        h('div', { class: 'verdict-line' },
          h('span', { class: `verdict ${res.significant ? 'verdict-bad' : 'verdict-ok'}`, 'data-testid': 'compare-verdict' },
            res.significant ? `A ${compareBy} differs` : `No ${compareBy} differs`),
          h('span', { class: 'muted' }, `F(${fmtQty(res.df_num, 1)}, ${fmtQty(res.df_den, 1)}) = ${fmtQty(res.f_statistic, 2)}, p ${fmtP(res.p_value).startsWith('<') ? '' : '= '}${fmtP(res.p_value)}`
            + ` · α = ${fmtQty(res.alpha, 3)} · ${fmtNum(num(res.n))} batches · adjusted for ${adjusted.length ? adjusted.join(', ') : 'nothing'}`)),
        h('p', { class: 'summary', 'data-testid': 'compare-summary' }, capital(sentence(String(res.summary || '').replace(/\s+/g, ' ')))),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid compare-table compact', 'data-testid': 'compare-table' },
          h('thead', null, h('tr', null,
            h('th', null, factorLabel(compareBy)), h('th', { class: 'num' }, 'n'), h('th', { class: 'num' }, 'Mean'),
            h('th', { class: 'num' }, 'Effect'), h('th', { class: 'ci-head' }, 'Effect, 95 % CI', h('span', { class: 'unit' }, ' around 0')),
            h('th', { class: 'num' }, 'p'), h('th', null, ''))),
          h('tbody', null, strata.map((s) => h('tr', {
            'data-testid': 'compare-row', 'data-level': s.level, 'data-significant': String(!!s.significant), class: s.significant ? 'differs' : null,
          },
          h('td', { class: 'mono' }, levelText(compareBy, s.level)),
          h('td', { class: 'num' }, fmtNum(num(s.n))),
          h('td', { class: 'num' }, fmtNum(num(s.mean), digits)),
          h('td', { class: 'num' }, fmtSigned(s.effect, digits)),
          h('td', { class: 'ci-cell', title: `95 % interval ${fmtSigned(s.ci_low, digits)} to ${fmtSigned(s.ci_high, digits)}` }, intervalBar(s, scale, s.significant)),
          h('td', { class: 'num' }, fmtP(s.p_value)),
          h('td', null, s.significant ? h('span', { class: 'differs-badge' }, 'differs') : null)))))),
      ]);
    }

    // --- Cohort gate ---

    function renderGatePickers(levels) {
      if (gateFactor.value !== gate.factor) gateFactor.value = gate.factor;
      const list = levels || [];
      if (!gate.a || !list.includes(gate.a)) gate.a = list[0] || '';
      if (gate.b && (!list.includes(gate.b) || gate.b === gate.a)) gate.b = '';
      const aOptions = list.length ? list.map((l) => ({ v: l, t: levelText(gate.factor, l) })) : [{ v: '', t: 'no batches yet' }];
      reconcile(gateA, aOptions, (o) => o.v || '*', (o) => h('option', { value: o.v }), (opt, o) => setText(opt, o.t));
      const bOptions = [{ v: '', t: `All other ${factorLabel(gate.factor).toLowerCase()}s` },
        ...list.filter((l) => l !== gate.a).map((l) => ({ v: l, t: levelText(gate.factor, l) }))];
      reconcile(gateB, bOptions, (o) => o.v || '*', (o) => h('option', { value: o.v }), (opt, o) => setText(opt, o.t));
      if (gateA.value !== gate.a) gateA.value = gate.a;
      if (gateB.value !== gate.b) gateB.value = gate.b;
      gateA.disabled = list.length === 0;
      gateB.disabled = list.length < 2;
    }

    function gateKey() {
      return `${gate.factor}|${gate.a}|${gate.b}|${p.window}`;
    }

    const VERDICT = {
      VERDICT_REGRESSED: ['Regressed', 'verdict-bad'],
      VERDICT_NO_REGRESSION: ['No regression', 'verdict-ok'],
      VERDICT_INSUFFICIENT_DATA: ['Insufficient data', 'verdict-none'],
    };

    function directionText(d) {
      const s = String(d || '');
      if (s === 'higher-is-worse') return 'higher';
      if (s === 'lower-is-worse') return 'lower';
      if (s.startsWith('away-from:')) return `away from ${s.slice(10)}`;
      return s || '—';
    }

    function renderGate(res, levels) {
      if (!levels || levels.length < 2) {
        setChildren(gateBody, `few|${gate.factor}|${(levels || []).length}`, () => h('p', { class: 'panel-note', 'data-testid': 'gate-note' },
          fewLevelsNote(gate.factor, levels || [])));
        return;
      }
      if (!res) return;
      if (res.refused) {
        setChildren(gateBody, `refused|${res.refused}`, () => h('p', { class: 'panel-note', 'data-testid': 'gate-note' }, res.refused));
        return;
      }
      const [label, cls] = VERDICT[res.verdict] || [enumLabel(res.verdict, 'VERDICT_'), 'verdict-none'];
      const metrics = Array.isArray(res.metrics) ? res.metrics : [];
      const counts = Array.isArray(res.counts) ? res.counts : [];
      const aName = levelText(gate.factor, gate.a);
      const bName = gate.b ? levelText(gate.factor, gate.b) : 'the others';
      const result = (e) => (!e.enough_data ? h('span', { class: 'muted' }, 'too few')
        : e.regressed ? h('span', { class: 'differs-badge' }, 'worse') : h('span', { class: 'qc-pass' }, 'ok'));
      const sig = JSON.stringify([gateKey(), res.verdict, res.summary, res.batches_a, res.batches_b]);
      setChildren(gateBody, sig, () => [
        h('div', { class: 'verdict-line' },
          h('span', { class: `verdict ${cls}`, 'data-testid': 'gate-verdict', 'data-verdict': res.verdict }, label),
          h('span', { class: 'muted' }, `A: ${aName}, ${fmtNum(num(res.batches_a))} batches · B: ${bName}, ${fmtNum(num(res.batches_b))} batches`)),
        h('p', { class: 'summary', 'data-testid': 'gate-summary' }, capital(sentence(String(res.summary || '').replace(/\s+/g, ' ')))),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid gate-table compact', 'data-testid': 'gate-table' },
          h('thead', null, h('tr', null, ['Metric', 'n A / B', 'Mean A / B', 'A worse by', 'Effect', 'p', '']
            .map((c, i) => h('th', { class: i >= 1 && i <= 5 ? 'num' : null }, c)))),
          h('tbody', null, metrics.map((e) => {
            const d = digitsFor(Math.max(num(e.sd_a) || 0, num(e.sd_b) || 0));
            const m = metricInfo(e.metric);
            return h('tr', { 'data-testid': 'gate-row', 'data-metric': e.metric, class: e.regressed ? 'differs' : null },
              h('td', null, m.label, h('span', { class: 'sub' }, `worse when ${directionText(e.direction)}`)),
              h('td', { class: 'num' }, `${fmtNum(num(e.n_a))} / ${fmtNum(num(e.n_b))}`),
              h('td', { class: 'num', title: `sd ${fmtNum(num(e.sd_a), d)} / ${fmtNum(num(e.sd_b), d)}` },
                `${fmtNum(num(e.mean_a), d)} / ${fmtNum(num(e.mean_b), d)}`, m.unit ? h('span', { class: 'unit' }, ` ${m.unit}`) : null),
              h('td', { class: 'num' }, fmtSigned(e.worse_by, d)),
              h('td', { class: 'num' }, `${fmtSigned(e.effect_sigma, 2)}σ`),
              h('td', { class: 'num' }, fmtP(e.p_value)),
              h('td', null, result(e)));
          })))),
        counts.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'grid gate-table compact', 'data-testid': 'gate-counts' },
          h('thead', null, h('tr', null, ['Events', 'A', 'B', 'Rate ratio', 'p', '']
            .map((c, i) => h('th', { class: i >= 1 && i <= 4 ? 'num' : null }, c)))),
          h('tbody', null, counts.map((e) => h('tr', { 'data-testid': 'gate-count-row', class: e.regressed ? 'differs' : null },
            h('td', null, String(e.name || '').replace(/_/g, ' ')),
            h('td', { class: 'num' }, `${fmtNum(num(e.events_a))} of ${fmtNum(num(e.trials_a))} (${fmtPct(e.rate_a)})`),
            h('td', { class: 'num' }, `${fmtNum(num(e.events_b))} of ${fmtNum(num(e.trials_b))} (${fmtPct(e.rate_b)})`),
            h('td', { class: 'num' }, fmtQty(e.rate_ratio, 2)),
            h('td', { class: 'num' }, fmtP(e.p_value)),
            h('td', null, result(e))))))) : null,
      ]);
    }

    // Charts are drawn to the pixel width of their box; a resize redraws from the last answer.
    let lastWidth = 0;
    const resize = new ResizeObserver(() => {
      const w = Math.floor(chartArea.getBoundingClientRect().width);
      if (!lastCharts || Math.abs(w - lastWidth) < 8) return;
      lastWidth = w;
      renderCharts(lastCharts);
    });
    resize.observe(chartArea);

    renderPickers();
    return {
      root,
      title: 'Quality · Nanofleet',
      unmount() {
        resize.disconnect();
      },
      setParams(raw) {
        const next = qualityParams(raw);
        if (next.by !== p.by && next.by) compareBy = next.by;
        p = next;
        renderPickers();
        // Drawn afresh for the new selection rather than showing the old one under new pickers.
        chartSlot.clear();
        compareSlot.clear();
        healthSlot.clear();
      },
      async refresh(isCurrent) {
        const since = windowSince(p.window);
        const hKey = `${p.window}|${p.site}`;
        const cKey = chartKey();
        const cmpKey = compareKey();
        const wantHealth = healthSlot.due(hKey);
        const wantDevices = p.site && devicesSlot.due(p.site);
        const wantChart = chartSlot.due(cKey);
        const lKey = gate.factor;
        const wantLevels = levelsSlot.due(lKey);
        const wantCompareLevels = compareLevelsSlot.due(compareBy);

        const chartQuery = selectionQuery(null);
        chartQuery.set('metric', p.metric);
        if (p.by) chartQuery.set('by', p.by);
        chartQuery.set('points', p.by ? SMALL_CHART_POINTS : CHART_POINTS);
        const cmpQuery = selectionQuery(compareBy);
        cmpQuery.set('metric', p.metric);
        cmpQuery.set('by', compareBy);

        const levelsOf = (factor) => api(`api/quality/levels?factor=${encodeURIComponent(factor)}`);
        const [health, devs, charts, levels, compareLevels] = await Promise.all([
          wantHealth ? api(`api/quality/health?since_ms=${since || 1}`) : null,
          wantDevices ? api(`api/devices?site=${encodeURIComponent(p.site)}`) : null,
          wantChart ? api(`api/quality/chart?${chartQuery}`) : null,
          wantLevels ? levelsOf(gate.factor) : null,
          wantCompareLevels ? levelsOf(compareBy) : null,
        ]);
        if (!isCurrent()) return;
        if (health) healthSlot.keep(hKey, health);
        if (devs) devicesSlot.keep(p.site, devs);
        if (charts) chartSlot.keep(cKey, charts);
        if (levels) levelsSlot.keep(lKey, levels);
        if (compareLevels) compareLevelsSlot.keep(compareBy, compareLevels);

        // The comparisons wait for the levels they depend on: a question the data cannot
        // answer yet (one lot so far) is not asked.
        const listOf = (sl) => (sl.value && Array.isArray(sl.value.levels) ? sl.value.levels : []);
        const levelList = listOf(levelsSlot);
        const compareList = listOf(compareLevelsSlot);
        renderGatePickers(levelList);
        const gKey = gateKey();
        const wantGate = levelList.length >= 2 && gate.a && gateSlot.due(gKey);
        const wantCompare = compareList.length >= 2 && compareSlot.due(cmpKey);
        if (wantGate || wantCompare) {
          const q = new URLSearchParams({ factor: gate.factor, a: gate.a });
          if (gate.b) q.set('b', gate.b);
          if (since) q.set('since_ms', since);
          const [g, c] = await Promise.all([
            wantGate ? answerOrRefusal(api(`api/quality/gate?${q}`)) : null,
            wantCompare ? answerOrRefusal(api(`api/quality/compare?${cmpQuery}`)) : null,
          ]);
          if (!isCurrent()) return;
          if (g) gateSlot.keep(gKey, g);
          if (c) compareSlot.keep(cmpKey, c);
        }

        renderPickers();
        if (healthSlot.value) renderHealth(healthSlot.value);
        renderSiteDevices(devicesSlot.value);
        if (chartSlot.value && chartSlot.key === cKey) renderCharts(chartSlot.value);
        renderCompare(compareSlot.key === cmpKey ? compareSlot.value : null, compareLevelsSlot.key === compareBy ? compareList : null);
        renderGate(gateSlot.key === gateKey() ? gateSlot.value : null, levelList);
      },
    };
  }

  // === Alerts ===

  function alertKind(kind) {
    return ALERT_KIND_LABEL[kind] || enumLabel(kind, 'ALERT_KIND_');
  }

  function alertStateName(st) {
    return enumValue(st, 'ALERT_STATE_').toLowerCase() || 'unknown';
  }

  function alertStateBadge(st) {
    const name = alertStateName(st);
    return h('span', { class: `alert-state state-${name}`, 'data-testid': 'alert-state' }, name);
  }

  /** The alert's subject as a link: a device to its chart page, a site to its quality view. */
  function alertSubject(a) {
    const subject = a.subject || '';
    if (!subject) return '—';
    if (a.kind === 'ALERT_KIND_SITE_DIFFERS') return h('a', { href: qualityHash({ site: subject, metric: (a.evidence || {}).metric || '' }) }, siteName(subject));
    return h('a', { class: 'mono', href: deviceHash(subject) }, subject);
  }

  function alertsView(route) {
    let selected = route.id || '';
    let site = route.site || '';
    let filter = 'active';

    const stateFilter = h('select', {
      id: 'alert-state-filter',
      'data-testid': 'alert-state-filter',
      onchange: () => {
        filter = stateFilter.value;
        refreshNow();
      },
    }, ALERT_STATES.map(([value, label]) => h('option', { value }, label)));
    const siteChip = h('span');
    const count = h('span', { class: 'count', 'data-testid': 'alert-count' });
    const tbody = h('tbody');
    const detail = h('section', { class: 'alert-detail', 'aria-label': 'Selected alert' });
    const root = h('div', { class: 'alerts' },
      h('div', { class: 'page-title' }, h('h1', null, 'Alerts'),
        h('span', { class: 'muted' }, 'Control-chart signals, silent devices and sites that differ, with their evidence')),
      h('div', { class: 'toolbar' }, h('label', { for: 'alert-state-filter' }, 'State'), stateFilter, siteChip, count),
      h('div', { class: 'card table-wrap' },
        h('table', { class: 'grid', 'data-testid': 'alert-table' },
          h('thead', null, h('tr', null, ALERT_COLUMNS.map((name) => h('th', { class: name === 'Seen' ? 'num' : null }, name)))),
          tbody)),
      detail);

    function renderSiteChip() {
      setChildren(siteChip, site, () => (site
        ? h('span', { class: 'scope-chip' }, `Site: ${siteName(site)}`,
          h('a', { class: 'scope-remove', href: alertHash(selected, ''), title: 'Show every site' }, '×'))
        : null));
    }

    function createRow(a) {
      const cells = ALERT_COLUMNS.map((name) => h('td', { class: { Seen: 'num', Alert: 'wrap', Site: 'site' }[name] || null }));
      const row = h('tr', { class: 'link', 'data-testid': 'alert-row', 'data-alert-id': a.alert_id }, cells);
      row.addEventListener('click', (ev) => {
        if (ev.target.closest('a')) return;
        navigate(alertHash(a.alert_id, site));
      });
      row._cells = cells;
      return row;
    }

    function updateRow(row, a) {
      const [st, kind, title, siteCell, raised, lastSeen, seen] = row._cells;
      const name = alertStateName(a.state);
      setClass(row, `link${a.alert_id === selected ? ' selected' : ''}${name === 'resolved' ? ' inactive' : ''}${name === 'open' ? ' alert-open' : ''}`);
      setAttr(row, 'data-state', name);
      setChildren(st, a.state, () => alertStateBadge(a.state));
      setText(kind, alertKind(a.kind));
      setText(title, a.title || '—');
      setText(siteCell, a.site_id ? siteName(a.site_id) : '—');
      setText(raised, fmtDateTime(num(a.raised_unix_ms)));
      setText(lastSeen, fmtAgo(num(a.last_seen_unix_ms)));
      setClass(lastSeen, 'muted');
      setText(seen, `${fmtNum(num(a.occurrences) || 1)}×`);
    }

    function renderList(list) {
      const open = list.filter((a) => a.state === 'ALERT_STATE_OPEN').length;
      setText(count, `${fmtNum(list.length)} alert${list.length === 1 ? '' : 's'}${open ? ` · ${fmtNum(open)} open` : ''}`);
      if (list.length === 0) {
        const what = (ALERT_STATES.find(([v]) => v === filter) || ['', ''])[1].toLowerCase();
        setChildren(tbody, `empty|${filter}|${site}`, () => h('tr', null, h('td', { class: 'empty', colspan: ALERT_COLUMNS.length, 'data-testid': 'alerts-empty' },
          filter === 'active' || filter === 'open'
            ? [h('span', { class: 'dot on' }), ` No ${what} alerts${site ? ' at this site' : ''}: every chart is in control and every device is reporting.`]
            : `No ${what} alerts${site ? ' at this site' : ''}.`)));
        return;
      }
      delete tbody.dataset.sig;
      reconcile(tbody, list, (a) => a.alert_id, createRow, updateRow);
    }

    function renderDetail(a) {
      const name = alertStateName(a.state);
      setAttr(detail, 'data-testid', 'alert-detail');
      setAttr(detail, 'data-alert-id', a.alert_id);
      setAttr(detail, 'data-state', name);
      // Built once per alert and state, so a note being typed survives the refreshes.
      setChildren(detail, `${a.alert_id}|${a.state}|${state.me ? state.me.role : ''}`, () => {
        const seen = h('span', { class: 'alert-seen' });
        const evidenceSlot = h('div', { class: 'evidence-slot' });
        const ev = a.evidence || {};
        const head = h('section', { class: 'card recipe-head alert-head' },
          h('div', { class: 'recipe-title' },
            h('h2', null, a.title || alertKind(a.kind)), alertStateBadge(a.state),
            h('span', { class: 'alert-kind' }, alertKind(a.kind))),
          h('dl', { class: 'facts' },
            spec('Subject', alertSubject(a)),
            spec('Site', a.site_id ? h('a', { href: qualityHash({ site: a.site_id, by: 'device', metric: ev.metric || '' }) }, siteName(a.site_id)) : '—'),
            spec('Raised', fmtDateTime(num(a.raised_unix_ms))),
            spec('Last seen', seen),
            hasTime(num(a.resolved_unix_ms)) ? spec('Resolved', fmtDateTime(num(a.resolved_unix_ms))) : null),
          h('p', { class: 'alert-id muted' }, 'Alert ', h('span', { class: 'mono' }, a.alert_id)));
        head._seen = seen;
        return [head,
          h('div', { class: 'alert-grid' },
            h('section', { class: 'card', 'data-testid': 'alert-evidence' },
              h('div', { class: 'card-head' }, h('h2', null, 'Evidence'),
                ev.rule ? ruleChip(ev.rule, ev.description) : null,
                ev.description ? h('span', { class: 'muted' }, ev.description) : null,
                ev.metric ? h('a', {
                  class: 'card-head-link',
                  href: qualityHash({ metric: ev.metric, ...(a.kind === 'ALERT_KIND_SITE_DIFFERS' ? { site: a.site_id, by: 'lot' } : { device: a.subject }) }),
                }, 'Open in Quality ›') : null),
              evidenceSlot),
            ackCard(a))];
      });
      const head = detail.querySelector('.alert-head');
      if (head && head._seen) {
        setText(head._seen, `${fmtDateTime(num(a.last_seen_unix_ms))} · ${fmtNum(num(a.occurrences) || 1)}× raised`);
      }
      const slotEl = detail.querySelector('.evidence-slot');
      if (slotEl) renderEvidence(slotEl, a);
    }

    function renderEvidence(slotEl, a) {
      const ev = a.evidence || {};
      const pts = ev.points || [];
      const width = Math.max(320, Math.floor(slotEl.getBoundingClientRect().width) - 24) || 600;
      setChildren(slotEl, `${a.alert_id}|${a.occurrences}|${a.last_seen_unix_ms}|${width}`, () => {
        const chart = {
          metric: ev.metric, center: ev.center, ucl: ev.ucl, lcl: ev.lcl, sigma: ev.sigma, points: pts, baseline_points: 0,
        };
        const m = metricInfo(ev.metric);
        return [
          pts.length
            ? h('div', { class: 'evidence-chart' },
              h('div', { class: 'evidence-caption' }, `${m.label}${m.unit ? ` (${m.unit})` : ''}: the newest ${fmtNum(pts.length)} batches of ${a.subject || 'the chart'}`,
                h('span', { class: 'legend' },
                  h('span', { style: `color:${SPC.center}` }, h('i'), `centre ${fmtNum(num(ev.center), digitsFor(3 * (num(ev.sigma) || 0)))}`),
                  h('span', { style: `color:${SPC.limit}` }, h('i'), 'UCL / LCL'),
                  h('span', { style: `color:${SPC.signal}` }, h('i', { class: 'dotonly' }), 'rule fired'))),
              controlChartSvg(chart, width, {
                compact: true, height: 170, id: 'evidence', highlight: ev.rule,
                ruleText: (code) => (code === ev.rule ? ev.description || '' : ''),
                onPoint: (pt) => navigate(batchHash(pt.batch_id)),
              }))
            : null,
          ev.detail ? h('p', { class: 'evidence-detail', 'data-testid': 'alert-evidence-detail' }, sentence(ev.detail)) : null,
          !pts.length && !ev.detail ? h('p', { class: 'empty' }, 'No chart for this kind of alert.') : null,
        ];
      });
    }

    function ackCard(a) {
      const name = alertStateName(a.state);
      const head = h('div', { class: 'card-head' }, h('h2', null, 'Acknowledgement'));
      if (name === 'acknowledged' || a.acknowledged_by) {
        return h('section', { class: 'card', 'data-testid': 'alert-ack' }, head,
          h('div', { class: 'card-body' },
            h('dl', { class: 'spec' },
              spec('By', h('span', { 'data-testid': 'alert-ack-by' }, a.acknowledged_by || '—')),
              spec('At', fmtDateTime(num(a.acknowledged_unix_ms))),
              spec('Note', h('span', { class: 'ack-note', 'data-testid': 'alert-ack-note' }, a.note || '—')))));
      }
      if (name === 'resolved') {
        return h('section', { class: 'card', 'data-testid': 'alert-ack' }, head,
          h('p', { class: 'card-body muted' }, `Resolved ${fmtDateTime(num(a.resolved_unix_ms))} without an acknowledgement: the condition cleared.`));
      }
      if (!can(ALERT_ACK_ROLES)) {
        const role = state.me ? state.me.role : '';
        return h('section', { class: 'card', 'data-testid': 'alert-ack' }, head,
          h('p', { class: 'card-body muted', 'data-testid': 'alert-ack-role-note' },
            `Operations and QA acknowledge alerts; your role (${ROLE_LABEL[role] || role}) can read them.`));
      }
      const note = h('textarea', {
        id: 'alert-ack-note-input', rows: 3, required: true, 'data-testid': 'alert-ack-input',
        placeholder: 'What was found or done, e.g. "pump head replaced, next batches watched"',
      });
      const submit = h('button', { type: 'submit', class: 'btn btn-primary', 'data-testid': 'alert-ack-submit' }, 'Acknowledge');
      const error = h('p', { class: 'form-error', role: 'alert', 'data-testid': 'alert-ack-error', hidden: true });
      // novalidate: the page says why an empty note is refused, in its own words.
      const form = h('form', {
        class: 'card-body ack-form', 'data-testid': 'alert-ack-form', novalidate: true,
        onsubmit: async (ev) => {
          ev.preventDefault();
          const text = note.value.trim();
          error.hidden = true;
          if (!text) {
            setText(error, 'Write a note: what was found or done. It goes into the audit trail.');
            error.hidden = false;
            note.focus();
            return;
          }
          submit.disabled = true;
          setText(submit, 'Acknowledging…');
          try {
            await api(`api/alerts/${encodeURIComponent(a.alert_id)}/ack`, { method: 'POST', body: { note: text } });
            // The next refresh shows who acknowledged it and the note; the badge counts one fewer.
            alertBadge.at = 0;
            refreshNow();
          } catch (err) {
            if (isSignedOutError(err)) {
              showLogin(SESSION_ENDED);
              return;
            }
            setText(error, err instanceof UnreachableError ? `Server unreachable (${err.message}): not acknowledged.` : sentence(err.message));
            error.hidden = false;
            submit.disabled = false;
            setText(submit, 'Acknowledge');
          }
        },
      },
      h('label', { for: 'alert-ack-note-input' }, 'Note'),
      note,
      h('p', { class: 'hint' }, `Signed as ${state.me ? state.me.display_name || state.me.id : ''}; recorded with the time in the audit trail.`),
      error,
      h('div', null, submit));
      return h('section', { class: 'card', 'data-testid': 'alert-ack' }, head, form);
    }

    return {
      root,
      title: 'Alerts · Nanofleet',
      select(id, nextSite) {
        selected = id || '';
        site = nextSite || '';
        detail.replaceChildren();
        delete detail.dataset.sig;
      },
      async refresh(isCurrent) {
        const q = new URLSearchParams({ state: filter });
        if (site) q.set('site', site);
        const sel = selected;
        const [fleet, res] = await Promise.all([api('api/fleet'), api(`api/alerts?${q}`)]);
        if (!isCurrent()) return;
        rememberSites(fleet);
        const list = Array.isArray(res.alerts) ? res.alerts : [];
        if (filter === 'active' && !site) noteOpenAlerts(list.filter((a) => a.state === 'ALERT_STATE_OPEN').length);
        let chosen = sel ? list.find((a) => a.alert_id === sel) : null;
        if (sel && !chosen) {
          // Selected but filtered out (acknowledged while the list shows open ones).
          const all = await api('api/alerts?state=all');
          if (!isCurrent()) return;
          chosen = (all.alerts || []).find((a) => a.alert_id === sel) || null;
        }
        renderSiteChip();
        if (stateFilter.value !== filter) stateFilter.value = filter;
        renderList(list);
        if (!sel) {
          setChildren(detail, 'hint', () => h('p', { class: 'card note', 'data-testid': 'alert-hint' },
            list.length ? 'Select an alert to see its evidence and to acknowledge it.' : 'Alerts appear here when a device\'s chart signals, a device goes silent or a site differs from the fleet.'));
          setAttr(detail, 'data-testid', null);
        } else if (!chosen) {
          setChildren(detail, `missing|${sel}`, () => h('section', { class: 'card notice', 'data-testid': 'alert-missing' },
            h('h1', null, `Alert ${sel} not found`), h('p', null, h('a', { href: '#/alerts' }, 'Back to all alerts'))));
        } else {
          renderDetail(chosen);
        }
      },
    };
  }

  // === Open-alert count in the navigation ===

  const alertBadge = { at: 0, busy: false };

  function noteOpenAlerts(n) {
    alertBadge.at = Date.now();
    const badge = el.alertsBadge;
    if (!badge) return;
    badge.hidden = !(n > 0);
    setText(badge, n >= 200 ? '200+' : String(n));
    setAttr(badge, 'data-count', n);
    setAttr(el.alertsNav, 'title', n ? `${n} open alert${n === 1 ? '' : 's'}` : 'No open alerts');
  }

  /** Refreshes the badge every so often, whatever page is shown; a failure leaves it as it was. */
  function pollAlertBadge() {
    if (alertBadge.busy || Date.now() - alertBadge.at < ALERT_BADGE_MS || state.signedOut || !state.me) return;
    alertBadge.busy = true;
    api('api/alerts?state=open')
      .then((res) => noteOpenAlerts(Array.isArray(res.alerts) ? res.alerts.length : 0))
      .catch(() => {})
      .finally(() => {
        alertBadge.busy = false;
      });
  }

  // === Unknown route ===

  // === Rollouts ===

  function rolloutHash(id) {
    return id ? `#/rollouts/${encodeURIComponent(id)}` : '#/rollouts';
  }

  function countOf(counts, status) {
    return (counts && counts[status]) || 0;
  }

  function totalOf(counts) {
    return Object.values(counts || {}).reduce((a, b) => a + b, 0);
  }

  /** One bar per wave: devices by status, as stacked segments with a legend line. */
  function waveBar(counts, label, current) {
    const total = totalOf(counts);
    const segments = ROLLOUT_STATUSES.filter((s) => countOf(counts, s) > 0).map((s) =>
      h('span', {
        class: `seg status-${s}`,
        style: `width: ${(100 * countOf(counts, s)) / Math.max(1, total)}%`,
        title: `${s}: ${countOf(counts, s)}`,
        'data-status': s,
      }));
    const legend = ROLLOUT_STATUSES.filter((s) => countOf(counts, s) > 0).map((s) => `${s} ${countOf(counts, s)}`).join(' · ');
    return h('div', { class: `wave-row${current ? ' current' : ''}`, 'data-testid': 'rollout-wave' },
      h('span', { class: 'wave-label' }, label),
      h('span', { class: 'wave-bar', role: 'img', 'aria-label': `${label}: ${legend}` }, segments),
      h('span', { class: 'wave-legend muted' }, `${total} devices · ${legend}`));
  }

  function rolloutStateBadge(state) {
    return h('span', { class: `rollout-state state-${state}`, 'data-testid': 'rollout-state' }, state);
  }

  function rolloutsView(route) {
    let selected = route.id || '';
    const tbody = h('tbody');
    const count = h('span', { class: 'count', 'data-testid': 'rollout-count' });
    const roleNote = h('div');
    const detail = h('section', { class: 'rollout-detail', 'aria-label': 'Selected rollout' });
    const listSection = h('div', null,
      h('div', { class: 'toolbar' }, count),
      h('div', { class: 'card table-wrap' },
        h('table', { class: 'grid', 'data-testid': 'rollout-table' },
          h('thead', null, h('tr', null, ['Rollout', 'Release', 'State', 'Wave', 'Committed', 'Failed', 'Devices', 'Created']
            .map((n) => h('th', { class: ['Wave', 'Committed', 'Failed', 'Devices'].includes(n) ? 'num' : null }, n)))),
          tbody)));
    const root = h('div', { class: 'rollouts' },
      h('div', { class: 'page-title' }, h('h1', null, 'Rollouts'),
        h('span', { class: 'muted' }, 'Firmware releases going to the fleet in waves; what each device reported')),
      roleNote, listSection, detail);

    function createRow(r) {
      const cells = [0, 1, 2, 3, 4, 5, 6, 7].map((i) => h('td', { class: [3, 4, 5, 6].includes(i) ? 'num' : null }));
      const row = h('tr', { class: 'link', 'data-testid': 'rollout-row', 'data-rollout-id': r.rollout_id }, cells);
      row.addEventListener('click', (ev) => {
        if (ev.target.closest('a')) return;
        navigate(rolloutHash(r.rollout_id));
      });
      row._cells = cells;
      return row;
    }

    function updateRow(row, r) {
      const [id, release, st, wave, committed, failed, devices, created] = row._cells;
      setClass(row, `link${r.rollout_id === selected ? ' selected' : ''}`);
      setAttr(row, 'data-state', r.state);
      setChildren(id, r.rollout_id, () => h('a', { class: 'id-link', href: rolloutHash(r.rollout_id) }, r.rollout_id));
      setText(release, r.target);
      setChildren(st, r.state, () => rolloutStateBadge(r.state));
      setText(wave, `${r.wave + 1} / ${r.waves}`);
      setText(committed, countOf(r.counts, 'committed'));
      setText(failed, [...ROLLOUT_FAILURES].reduce((a, s) => a + countOf(r.counts, s), 0));
      setText(devices, totalOf(r.counts));
      setText(created, fmtUtc(r.created_unix_ms));
    }

    function renderDetail(r) {
      if (!r) {
        detail.replaceChildren(h('p', { class: 'card note muted' }, 'Select a rollout to see its waves and devices.'));
        return;
      }
      const failures = r.devices.filter((d) => ROLLOUT_FAILURES.has(d.status));
      const under = r.devices.filter((d) => !['pending', 'committed', 'cancelled'].includes(d.status) && !ROLLOUT_FAILURES.has(d.status));
      const deviceRows = (list) => list.slice(0, 500).map((d) => h('tr', { 'data-testid': 'rollout-device', 'data-device-id': d.device_id, 'data-status': d.status },
        h('td', null, h('a', { class: 'id-link', href: deviceHash(d.device_id) }, d.device_id)),
        h('td', null, siteName(d.site_id)),
        h('td', { class: 'num' }, d.wave + 1),
        h('td', null, h('span', { class: `rollout-status status-${d.status}` }, d.status)),
        h('td', null, d.code || '—'),
        h('td', { class: 'wrap' }, d.detail || '—'),
        h('td', null, fmtUtc(d.updated_unix_ms))));
      const table = (title, list, testid) => h('div', { class: 'card table-wrap', 'data-testid': testid },
        h('h2', null, `${title} (${list.length})`),
        list.length === 0 ? h('p', { class: 'muted' }, 'None.') : h('table', { class: 'grid' },
          h('thead', null, h('tr', null, ['Device', 'Site', 'Wave', 'Status', 'Code', 'Detail', 'Updated'].map((n) => h('th', null, n)))),
          h('tbody', null, deviceRows(list))));
      detail.replaceChildren(
        h('div', { class: 'card rollout-head', 'data-testid': 'rollout-head', 'data-rollout-id': r.rollout_id },
          h('h2', null, `${r.rollout_id} · ${r.target}`, ' ', rolloutStateBadge(r.state)),
          r.reason ? h('p', { class: 'rollout-reason', 'data-testid': 'rollout-reason' }, r.reason) : null,
          h('p', { class: 'muted' },
            `${r.action} · next wave at ${r.success_threshold_pct}% committed · pauses at ${r.error_threshold_pct}% of a wave failed · created ${fmtUtc(r.created_unix_ms)}`),
          waveBar(r.counts, 'All', false),
          r.wave_counts.map((w) => waveBar(w.counts, `Wave ${w.wave + 1}`, w.wave === r.wave && r.state === 'running'))),
        healthCard(r),
        table('Failures, with the device\'s reason', failures, 'rollout-failures'),
        table('Under way', under, 'rollout-underway'));
    }

    // The health gate's answers: what it compared after each wave and what it found.
    function healthCard(r) {
      if (!r.health_watch_seconds && r.health_checks.length === 0) return null;
      const watch = r.health_watch_seconds
        ? `Each wave's devices are watched ${fmtDuration(r.health_watch_seconds * 1000)}, then their alarms and batch quality are compared with devices still on another version${r.rollback_on_regression ? '; a regression rolls them back' : ''}.`
        : 'No health gate.';
      return h('div', { class: 'card', 'data-testid': 'rollout-health' },
        h('h2', null, 'Health gate'),
        h('p', { class: 'muted' }, watch),
        r.health_checks.length === 0 ? h('p', { class: 'muted' }, 'No answer yet.')
          : h('ul', { class: 'health-checks' }, r.health_checks.slice().reverse().map((c) => h('li', {
            'data-testid': 'rollout-health-check', 'data-outcome': c.outcome, 'data-wave': c.wave,
          },
          h('span', { class: `rollout-state state-gate-${c.outcome}` }, c.outcome), ' ',
          `wave ${c.wave + 1} · ${fmtUtc(c.at_unix_ms)} · `, c.evidence))));
    }

    async function refresh(isCurrent) {
      const may = can(ROLLOUT_ROLES);
      listSection.hidden = !may;
      detail.hidden = !may;
      const role = state.me ? state.me.role : '';
      setChildren(roleNote, `${role}|${may}`, () => (may ? null
        : h('p', { class: 'card note', 'data-testid': 'rollouts-role-note' },
          `Rollouts are read by operations, QA and auditors; your role (${ROLE_LABEL[role] || role}) has no access to them.`)));
      if (!may) return;
      const list = await api('api/rollouts');
      if (!isCurrent()) return;
      setText(count, `${list.rollouts.length} rollout${list.rollouts.length === 1 ? '' : 's'}`);
      reconcile(tbody, list.rollouts, (r) => r.rollout_id, createRow, updateRow);
      if (!selected && list.rollouts.length > 0) selected = list.rollouts[0].rollout_id;
      if (!selected) {
        renderDetail(null);
        return;
      }
      const r = await api(`api/rollouts/${encodeURIComponent(selected)}`);
      if (!isCurrent()) return;
      renderDetail(r);
    }

    return {
      root,
      title: 'Rollouts · Nanofleet',
      refresh,
      select(id) {
        selected = id || '';
      },
    };
  }

  // === Inventory ===

  const DENY_ROLES = new Set(['ops', 'qa', 'auditor']);

  // Days of cover as a bar: full at three lead times; red under the lead time, amber
  // at the reorder point.
  function coverBar(line) {
    const lead = Number(line.lead_time_days) || 1;
    const days = line.days_of_cover == null ? null : Number(line.days_of_cover);
    const level = line.alerts.some((a) => a.kind === 'runs-out') ? 'low'
      : line.alerts.some((a) => a.kind === 'reorder') ? 'reorder' : 'ok';
    const pct = days == null ? 100 : Math.max(2, Math.min(100, (days / (3 * lead)) * 100));
    return h('div', { class: `cover cover-${level}`, title: days == null ? 'nothing consumed yet' : `${fmtNum(days, 1)} days of cover; lead time ${lead} days` },
      h('div', { class: 'cover-fill', style: `width: ${pct}%` }),
      h('span', { class: 'cover-text' }, days == null ? '—' : `${fmtNum(days, 1)} d`));
  }

  function inventoryView() {
    const stockBody = h('tbody');
    const lotBody = h('tbody');
    const deny = h('div', { class: 'card', 'data-testid': 'deny-status' });
    const root = h('div', { class: 'inventory' },
      h('div', { class: 'page-title' }, h('h1', null, 'Inventory'),
        h('span', { class: 'muted' }, 'Cartridges per hospital from real runs, when to order, lots and recalls')),
      h('div', { class: 'card table-wrap' },
        h('h2', null, 'Stock by site'),
        h('table', { class: 'grid', 'data-testid': 'stock-table' },
          h('thead', null, h('tr', null, ['Site', 'Cartridge', 'On hand', 'Usable', 'In transit', 'Per day', 'Days of cover', 'Reorder at', 'Order now', 'Alerts']
            .map((n) => h('th', { class: ['On hand', 'Usable', 'In transit', 'Per day', 'Reorder at', 'Order now'].includes(n) ? 'num' : null }, n)))),
          stockBody)),
      deny,
      h('div', { class: 'card table-wrap' },
        h('h2', null, 'Lots'),
        h('table', { class: 'grid', 'data-testid': 'lot-table' },
          h('thead', null, h('tr', null, ['Lot', 'GTIN', 'Produced', 'Expires', 'Quantity', 'Status', 'Why']
            .map((n) => h('th', { class: n === 'Quantity' ? 'num' : null }, n)))),
          lotBody)));

    function createStockRow(l) {
      const cells = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9].map((i) => h('td', { class: [2, 3, 4, 5, 7, 8].includes(i) ? 'num' : (i === 9 ? 'wrap' : null) }));
      const row = h('tr', { 'data-testid': 'stock-row', 'data-site': l.site_id, 'data-gtin': l.gtin }, cells);
      row._cells = cells;
      return row;
    }

    function updateStockRow(row, l) {
      const [site, kind, onHand, usable, transit, rate, cover, reorder, order, alerts] = row._cells;
      setAttr(row, 'data-alerts', l.alerts.map((a) => a.kind).join(' '));
      setText(site, siteName(l.site_id));
      setText(kind, l.name || l.gtin);
      setText(onHand, l.on_hand);
      setText(usable, l.usable);
      setText(transit, l.in_transit || '—');
      setText(rate, fmtNum(Number(l.consumption_per_day), 1));
      setChildren(cover, `${l.days_of_cover}|${l.alerts.map((a) => a.kind).join()}`, () => coverBar(l));
      setText(reorder, l.reorder_point);
      setText(order, l.suggested_order || '—');
      setChildren(alerts, l.alerts.map((a) => a.message).join('|'), () => (l.alerts.length === 0 ? h('span', { class: 'muted' }, '—')
        : h('ul', { class: 'stock-alerts' }, l.alerts.map((a) => h('li', { class: `stock-alert alert-${a.kind}`, 'data-testid': 'stock-alert', 'data-kind': a.kind }, a.message)))));
    }

    function createLotRow(l) {
      const cells = [0, 1, 2, 3, 4, 5, 6].map((i) => h('td', { class: i === 4 ? 'num' : (i === 6 ? 'wrap' : null) }));
      const row = h('tr', { 'data-testid': 'lot-row', 'data-lot': l.lot }, cells);
      row._cells = cells;
      return row;
    }

    function updateLotRow(row, l) {
      const [lot, gtin, produced, expires, quantity, st, why] = row._cells;
      setAttr(row, 'data-status', l.status);
      setText(lot, l.lot);
      setText(gtin, l.gtin);
      setText(produced, l.produced);
      setText(expires, l.expires);
      setText(quantity, l.quantity);
      setChildren(st, l.status, () => h('span', { class: `lot-status lot-${l.status}` }, l.status));
      setText(why, l.status_reason || '—');
    }

    function renderDeny(d) {
      if (!d) {
        deny.replaceChildren(h('h2', null, 'Deny list'),
          h('p', { class: 'muted' }, 'Acknowledgements are read by operations, QA and auditors.'));
        return;
      }
      const version = Number(d.version);
      if (!version) {
        setAttr(deny, 'data-version', '0');
        deny.replaceChildren(h('h2', null, 'Deny list'), h('p', { class: 'muted' }, 'No lot recalled and no cartridge blocked yet.'));
        return;
      }
      const acked = Number(d.devices_acked);
      const total = Number(d.devices_total);
      setAttr(deny, 'data-version', String(version));
      setAttr(deny, 'data-acked', String(acked));
      setAttr(deny, 'data-total', String(total));
      const pct = total ? Math.round((acked / total) * 100) : 100;
      deny.replaceChildren(...[
        h('h2', null, `Deny list v${version}`, ' ',
          h('span', { class: `rollout-state ${acked === total ? 'state-completed' : 'state-running'}` }, acked === total ? 'acknowledged by every device' : 'in progress')),
        h('p', { class: 'muted' }, `Issued ${fmtUtc(Number(d.issued_unix_ms))} · ${d.lots} recalled lots · ${d.cartridges} blocked cartridges · every device refuses them, offline too.`),
        h('div', { class: 'ack-bar', title: `${acked} of ${total}` },
          h('div', { class: 'ack-fill', style: `width: ${pct}%` }),
          h('span', { class: 'ack-text', 'data-testid': 'deny-acked' }, `${acked} of ${total} devices acknowledged`)),
        d.pending.length === 0 ? null : h('table', { class: 'grid', 'data-testid': 'deny-pending' },
          h('thead', null, h('tr', null, ['Not acknowledged', 'Site', 'Online', 'Holds', 'Answer'].map((n) => h('th', null, n)))),
          h('tbody', null, d.pending.slice(0, 500).map((p) => h('tr', { 'data-testid': 'deny-pending-device', 'data-device-id': p.device_id },
            h('td', null, h('a', { class: 'id-link', href: deviceHash(p.device_id) }, p.device_id)),
            h('td', null, siteName(p.site_id)),
            h('td', null, p.online ? 'online' : 'offline'),
            h('td', null, Number(p.acked_version) ? `v${p.acked_version}` : '—'),
            h('td', { class: 'wrap' }, p.result ? `${p.result} ${p.code} ${p.reason}` : 'no answer yet')))))].filter(Boolean));
    }

    async function refresh(isCurrent) {
      const data = await api('api/inventory');
      if (!isCurrent()) return;
      reconcile(stockBody, data.stock, (l) => `${l.site_id}|${l.gtin}`, createStockRow, updateStockRow);
      reconcile(lotBody, data.lots, (l) => `${l.gtin}|${l.lot}`, createLotRow, updateLotRow);
      renderDeny(can(DENY_ROLES) ? data.deny_list : null);
    }

    return { root, title: 'Inventory · Nanofleet', refresh };
  }


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
    el.rolloutsNav = el.nav.querySelector('[data-nav="rollouts"]');
    el.alertsNav = el.nav.querySelector('[data-nav="alerts"]');
    el.alertsBadge = el.alertsNav.querySelector('.nav-badge');
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
