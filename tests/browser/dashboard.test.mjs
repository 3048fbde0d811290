// End-to-end check of the Nanofleet dashboard: a real `nanofleet demo` fleet (3 hospital
// sites, 24 simulated devices) and a headless Chromium driving the page like an operator.
// The dashboard is served over HTTPS with the fleet's own CA, so the browser is told to
// accept that certificate; the operator's password is read from the demo's banner.
//
//   NANOFLEET_BIN  server binary (default: <repo>/target/debug/nanofleet)
//   CHROMIUM       browser binary (default: /usr/bin/chromium)
//
// Screenshots and the server's log land in <repo>/target/browser/.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createWriteStream, existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '../..');
const serverBin = process.env.NANOFLEET_BIN
  ? path.resolve(process.env.NANOFLEET_BIN)
  : path.resolve(here, '../../target/debug/nanofleet');
const chromiumBin = process.env.CHROMIUM || '/usr/bin/chromium';
const outDir = path.join(repo, 'target', 'browser');

const SITES = 3;
const DEVICES = 24;
const DEVICES_PER_SITE = 8;
// Released by the demo to its first hospital's devices, signed by the demo's two people.
const DEMO_RECIPE = 'flu-h5-mrna';
const DEMO_SIGNATURES = [['Alice Martin, PharmD', 'authored'], ['Quinn Okafor (QA)', 'approved']];
const UTC_TIME = '\\d{4}-\\d{2}-\\d{2} \\d{2}:\\d{2}:\\d{2} UTC';
const STARTUP_TIMEOUT_MS = 30_000;
const SHUTDOWN_TIMEOUT_MS = 10_000;
const DASHBOARD_LINE = /dashboard\s+(https:\/\/\S+)/;
const LOGIN_LINE = /login\s+(\S+)\s+\/\s+(\S+)\s+\(dashboard\)/;
const QA_LINE = /qa\s+(\S+)\s+\/\s+(\S+)\s+\(approves recipes/;
const WRONG_PASSWORD = 'user id or password is wrong';
// Printed with `--server` in place of the address, which the page cannot know.
const GRPC_PLACEHOLDER = "<the server's gRPC address>";
// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[[0-9;]*[A-Za-z]/g;

/** `text` as a regular expression that matches it literally. */
function literal(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Polls `probe` until `ok` accepts its value; fails with the last value seen. */
async function until(what, probe, ok, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (ok(value)) return value;
    if (Date.now() > deadline) {
      assert.fail(`${what}: still ${JSON.stringify(value)} after ${timeoutMs / 1000} s`);
    }
    await sleep(250);
  }
}

/** The demo server as a process group, so SIGINT reaches it the way Ctrl-C in a terminal does. */
class DemoServer {
  constructor(dataDir) {
    this.dataDir = dataDir;
    this.output = [];
    this.exit = null;
  }

  async start() {
    await mkdir(outDir, { recursive: true });
    const log = createWriteStream(path.join(outDir, 'server.log'));
    const args = [
      'demo',
      '--data-dir', this.dataDir,
      '--http-listen', '127.0.0.1:0',
      '--grpc-listen', '127.0.0.1:0',
      '--mqtt-listen', '127.0.0.1:0',
    ];
    this.child = spawn(serverBin, args, {
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, NO_COLOR: '1' },
    });
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
      });
    });
    const keep = (chunk) => {
      log.write(chunk);
      this.output.push(chunk.toString());
      if (this.output.length > 400) this.output.splice(0, 200);
    };
    this.child.stderr.on('data', keep);

    // Resolves to { url, user, password } once the banner has shown both lines.
    return new Promise((resolve, reject) => {
      let pending = '';
      const found = {};
      const timer = setTimeout(() => {
        reject(new Error(`the demo printed no "dashboard https://…" and "login USER / PASSWORD" lines within ${STARTUP_TIMEOUT_MS / 1000} s\n${this.tail()}`));
      }, STARTUP_TIMEOUT_MS);
      this.child.once('error', (err) => {
        clearTimeout(timer);
        reject(new Error(`cannot start ${serverBin}: ${err.message}`));
      });
      this.exited.then(({ code, signal }) => {
        clearTimeout(timer);
        reject(new Error(`the demo exited (code ${code}, signal ${signal}) before serving the dashboard\n${this.tail()}`));
      });
      this.child.stdout.on('data', (chunk) => {
        keep(chunk);
        pending += chunk.toString().replace(ANSI, '');
        const lines = pending.split('\n');
        pending = lines.pop();
        for (const line of lines) {
          const dash = line.match(DASHBOARD_LINE);
          if (dash) found.url = dash[1];
          const login = line.match(LOGIN_LINE);
          if (login) [, found.user, found.password] = login;
          const qa = line.match(QA_LINE);
          if (qa) [, found.qaUser, found.qaPassword] = qa;
        }
        if (found.url && found.password && found.qaPassword) {
          clearTimeout(timer);
          resolve(found);
        }
      });
    });
  }

  get running() {
    return this.child != null && this.child.exitCode === null && this.child.signalCode === null;
  }

  signal(sig) {
    try {
      process.kill(-this.child.pid, sig);
    } catch (err) {
      if (err.code !== 'ESRCH') throw err;
    }
  }

  /** Resolves to the exit status, or null if the process is still running after `ms`. */
  async waitExit(ms) {
    return Promise.race([this.exited, sleep(ms).then(() => null)]);
  }

  tail() {
    const text = this.output.join('').replace(ANSI, '');
    return `--- last server output ---\n${text.slice(-4000)}`;
  }
}

describe('dashboard against a demo fleet', () => {
  let server;
  let context;
  let page;
  let dashboard;
  let login;
  let dataDir;
  let profileDir;
  const pageErrors = [];

  const at = (hash) => {
    const u = new URL(dashboard);
    u.hash = hash;
    return u.toString();
  };
  const count = (selector) => page.locator(selector).count();
  const shoot = (name) => page.screenshot({ path: path.join(outDir, name), fullPage: true });
  const signIn = async (user, password) => {
    await page.getByTestId('login-user').fill(user);
    await page.getByTestId('login-password').fill(password);
    await page.getByTestId('login-submit').click();
  };
  const apiStatus = (p) => page.evaluate(async (u) => (await fetch(u, { cache: 'no-store' })).status, p);

  before(async () => {
    assert.ok(existsSync(chromiumBin),
      `Chromium not found at ${chromiumBin}: install it (apt-get install -y chromium) or set CHROMIUM to a Chromium binary`);
    assert.ok(existsSync(serverBin),
      `nanofleet binary not found at ${serverBin}: build it with \`cargo build\` or set NANOFLEET_BIN`);

    dataDir = await mkdtemp(path.join(tmpdir(), 'nanofleet-data-'));
    profileDir = await mkdtemp(path.join(tmpdir(), 'nanofleet-chromium-'));
    server = new DemoServer(dataDir);
    // A crashed runner must not leave the fleet running in the background.
    process.once('exit', () => {
      if (server.running) server.signal('SIGKILL');
    });
    ({ url: dashboard, ...login } = await server.start());

    context = await chromium.launchPersistentContext(profileDir, {
      executablePath: chromiumBin,
      headless: true,
      // The fleet CA is self-signed and not in the browser's trust store.
      ignoreHTTPSErrors: true,
      viewport: { width: 1440, height: 900 },
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
    page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(15_000);
    page.on('pageerror', (err) => pageErrors.push(`uncaught: ${err.message}`));
    page.on('console', (msg) => {
      if (msg.type() === 'error' && server.running) pageErrors.push(`console: ${msg.text()}`);
    });
  }, { timeout: STARTUP_TIMEOUT_MS + 30_000 });

  after(async () => {
    await context?.close().catch(() => {});
    if (server?.running) {
      server.signal('SIGKILL');
      await server.waitExit(5_000);
    }
    for (const dir of [dataDir, profileDir]) {
      if (dir) await rm(dir, { recursive: true, force: true }).catch(() => {});
    }
  });

  it('asks to sign in, shows the server\'s refusal of a wrong password, then signs in', { timeout: 60_000 }, async () => {
    await page.goto(at('#/'));
    // Marks this document: if the dashboard ever reloaded itself the mark would be gone.
    await page.evaluate(() => { window.nanofleetTestMark = true; });

    await page.getByTestId('login-form').waitFor({ state: 'visible' });
    assert.equal(await apiStatus('api/fleet'), 401, 'the API needs a session');
    assert.equal(await page.getByTestId('whoami').isVisible(), false, 'nobody is shown as signed in');
    assert.equal(await page.getByTestId('error-banner').isVisible(), false, 'a 401 is not "server unreachable"');
    await shoot('login.png');

    await signIn(login.user, `${login.password}-wrong`);
    const error = page.getByTestId('login-error');
    await error.waitFor({ state: 'visible' });
    assert.match(await error.textContent(), new RegExp(WRONG_PASSWORD));
    assert.equal(await page.getByTestId('error-banner').isVisible(), false, 'a refused sign-in is not "server unreachable"');

    await signIn(login.user, login.password);
    await page.getByTestId('login-form').waitFor({ state: 'hidden' });
    const whoami = page.getByTestId('whoami');
    await whoami.waitFor({ state: 'visible' });
    assert.equal(await whoami.getAttribute('data-person-id'), login.user);
    assert.equal(await whoami.getAttribute('data-role'), 'ops');
    assert.equal(await page.getByTestId('logout').isVisible(), true);
    // The 401s above were provoked on purpose; from here on the page must stay clean.
    pageErrors.length = 0;
  });

  it('overview shows every site and all devices online', { timeout: 60_000 }, async () => {
    await until('site cards', () => count('[data-testid="site-card"]'), (n) => n === SITES, 10_000);
    const state = await until(
      'device tiles / online tiles / fleet-online',
      async () => ({
        tiles: await count('[data-testid="device-tile"]'),
        online: await count('[data-testid="device-tile"][data-online="true"]'),
        fleetOnline: (await page.getByTestId('fleet-online').textContent()).trim(),
      }),
      (s) => s.tiles === DEVICES && s.online === DEVICES && s.fleetOnline === String(DEVICES),
      20_000,
    );
    assert.equal(state.online, DEVICES);
    assert.equal((await page.getByTestId('fleet-total').textContent()).trim(), String(DEVICES));

    for (const card of await page.getByTestId('site-card').all()) {
      const siteId = await card.getAttribute('data-site-id');
      assert.ok(siteId, 'every site card names its site');
      assert.equal(await card.getByTestId('device-tile').count(), DEVICES_PER_SITE, `tiles on ${siteId}`);
    }
    await shoot('overview.png');
  });

  it('device table lists the fleet and the site filter narrows it', { timeout: 60_000 }, async () => {
    await page.getByRole('link', { name: 'Devices', exact: true }).click();
    await until('device rows', () => count('[data-testid="device-row"]'), (n) => n === DEVICES, 10_000);
    const ids = await page.getByTestId('device-row').evaluateAll((rows) => rows.map((r) => r.dataset.deviceId));
    assert.equal(new Set(ids).size, DEVICES, 'each device appears once');

    const filter = page.getByTestId('site-filter');
    const sites = (await filter.locator('option').evaluateAll((opts) => opts.map((o) => o.value))).filter(Boolean);
    assert.equal(sites.length, SITES, `site filter offers every site, got ${JSON.stringify(sites)}`);
    const site = sites[0];
    await filter.selectOption(site);
    const rowSites = await until(
      `rows for site ${site}`,
      () => page.getByTestId('device-row').evaluateAll((rows) => rows.map((r) => r.dataset.siteId)),
      (list) => list.length === DEVICES_PER_SITE && list.every((s) => s === site),
      10_000,
    );
    assert.equal(rowSites.length, DEVICES_PER_SITE);

    await filter.selectOption('');
    await until('device rows after clearing the filter', () => count('[data-testid="device-row"]'), (n) => n === DEVICES, 10_000);
  });

  it('device page opened from the overview draws live telemetry', { timeout: 60_000 }, async () => {
    await page.getByRole('link', { name: 'Overview', exact: true }).click();
    const tile = page.locator('[data-testid="device-tile"][data-online="true"]').first();
    const deviceId = await tile.getAttribute('data-device-id');
    await tile.click();
    await page.waitForURL((u) => decodeURIComponent(new URL(u).hash) === `#/devices/${deviceId}`);
    await until('device page heading', async () => (await page.locator('h1').first().textContent()).trim(), (t) => t === deviceId, 10_000);
    await until('device presence', () => count('[data-testid="device-presence"][data-online="true"]'), (n) => n === 1, 10_000);

    const chart = page.getByTestId('telemetry-chart');
    const points = async () => Number(await chart.getAttribute('data-points'));
    const first = await until('telemetry points drawn', points, (n) => n > 0, 15_000);
    await sleep(3_000);
    const later = await until(`telemetry points after ${first}`, points, (n) => n > first, 10_000);
    assert.ok(later > first);

    // History from the rollups: the last hour of the chamber temperature, per minute.
    const history = page.getByTestId('series-card');
    await history.getByTestId('series-metric').selectOption('chamber_temperature');
    await history.getByTestId('series-window').selectOption(String(3600e3));
    const seriesChart = history.getByTestId('series-chart');
    const drawn = await until(
      'the hour of chamber temperature drawn',
      async () => ({ points: Number(await seriesChart.getAttribute('data-points')), meta: await history.getByTestId('series-meta').textContent() }),
      (v) => v.points > 0 && /minute rollups · 1 min buckets · °C/.test(v.meta),
      20_000,
    );
    assert.ok(drawn.points >= 1 && drawn.points <= 61, `one point per minute of the hour, got ${drawn.points}`);
    assert.equal(await history.getByTestId('series-median').count(), 1, 'the median is drawn');

    assert.equal(await page.evaluate(() => window.nanofleetTestMark), true, 'the page was never reloaded');
    assert.deepEqual(pageErrors, [], 'no script or network errors in the page');
    await shoot('device.png');
  });

  it('recipes page shows the released demo recipe, its two signatures and its delivery', { timeout: 60_000 }, async () => {
    await page.getByRole('link', { name: 'Recipes', exact: true }).click();
    await page.waitForURL((u) => new URL(u).hash === '#/recipes');

    // "printed name — meaning — UTC time" for each signature, in the list already.
    // Version 1 is the first hospital's (each hospital's pharmacist releases their own).
    const row = page.locator(`[data-testid="recipe-row"][data-recipe-id="${DEMO_RECIPE}"][data-version="1"]`);
    const listed = await until(
      `${DEMO_RECIPE} in the recipe list`,
      async () => ((await row.count()) === 1
        ? { status: await row.getAttribute('data-status'), signatures: await row.getByTestId('recipe-row-signature').allTextContents() }
        : null),
      (v) => v != null && v.status === 'released' && v.signatures.length === DEMO_SIGNATURES.length,
      15_000,
    );
    for (const [name, meaning] of DEMO_SIGNATURES) {
      const line = new RegExp(`^${literal(name)} — ${meaning} — ${UTC_TIME}$`);
      assert.ok(listed.signatures.some((s) => line.test(s.trim())), `a signature ${line} among ${JSON.stringify(listed.signatures)}`);
    }

    await row.click();
    await page.waitForURL((u) => decodeURIComponent(new URL(u).hash) === `#/recipes/${DEMO_RECIPE}/1`);
    const detail = page.locator(`[data-testid="recipe-detail"][data-recipe-id="${DEMO_RECIPE}"][data-version="1"]`);
    await detail.waitFor({ state: 'visible' });
    assert.equal(await detail.getAttribute('data-status'), 'released');
    assert.match((await detail.getByTestId('recipe-digest').textContent()).trim(), /^[0-9a-f]{64}$/, 'the digest the signatures cover');
    assert.match(await detail.getByTestId('recipe-formula').textContent(), /50 : 10 : 38\.5 : 1\.5/, 'lipid molar ratios');
    assert.ok(await detail.getByTestId('procedure-step').count() > 0, 'the procedure lists its steps');

    // Each signature's manifestation: printed name, UTC date and time, meaning.
    const signatures = await detail.getByTestId('recipe-signature').evaluateAll((items) => items.map((li) => ({
      meaning: li.dataset.meaning,
      name: li.querySelector('[data-testid="signature-name"]').textContent.trim(),
      time: li.querySelector('[data-testid="signature-time"]').textContent.trim(),
    })));
    assert.deepEqual(
      signatures.map((s) => [s.name, s.meaning]).sort(),
      DEMO_SIGNATURES.map(([name, meaning]) => [name, meaning]).sort(),
    );
    for (const s of signatures) assert.match(s.time, new RegExp(`^${UTC_TIME}$`), `time of the ${s.meaning} signature`);

    // The demo releases to the first hospital's devices; each verifies and accepts it.
    const bar = page.getByTestId('delivery-bar');
    const counts = await until(
      'delivery counts',
      async () => ({
        accepted: Number(await bar.getAttribute('data-accepted')),
        refused: Number(await bar.getAttribute('data-refused')),
        pending: Number(await bar.getAttribute('data-pending')),
        rows: await page.locator('[data-testid="delivery-row"][data-state="accepted"]').count(),
      }),
      (c) => c.accepted === DEVICES_PER_SITE && c.rows === DEVICES_PER_SITE,
      20_000,
    );
    assert.deepEqual(counts, { accepted: DEVICES_PER_SITE, refused: 0, pending: 0, rows: DEVICES_PER_SITE });
    assert.equal((await page.getByTestId('delivery-accepted').textContent()).trim(), String(DEVICES_PER_SITE));
    assert.equal(await count('[data-testid="delivery-row"]'), DEVICES_PER_SITE, 'one row per target device');

    assert.deepEqual(pageErrors, [], 'no script or network errors in the page');
    await shoot('recipes.png');
  });

  it('rollouts page shows the demo\'s firmware going out in waves, and the hospital whose window defers it', { timeout: 200_000 }, async () => {
    await page.getByRole('link', { name: 'Rollouts', exact: true }).click();
    await page.waitForURL((u) => new URL(u).hash === '#/rollouts');
    // The good build's two rollouts; the faulty build's follows once the first is done.
    const rows = page.getByTestId('rollout-row').filter({ hasText: '2.5.0' });
    await until('the demo\'s two rollouts of its good build', () => rows.count(), (n) => n >= 2, 90_000);
    // Newest first: the last hospital's, whose maintenance window opens hours from now.
    const night = rows.nth(0);
    const nightId = await night.getAttribute('data-rollout-id');
    await night.click();
    await page.waitForURL((u) => decodeURIComponent(new URL(u).hash) === `#/rollouts/${nightId}`);
    const head = page.locator(`[data-testid="rollout-head"][data-rollout-id="${nightId}"]`);
    await head.waitFor({ state: 'visible' });
    assert.ok(await head.getByTestId('rollout-wave').count() >= 2, 'a bar for all devices and one per wave');
    assert.ok(await head.locator('.seg[data-status="pending"]').count() >= 1, 'its devices wait for their window');
    assert.equal(await head.locator('.seg[data-status="committed"]').count(), 0, 'none offered outside the window');

    // The first hospitals' rollout: devices commit the new build, wave after wave.
    const day = rows.nth(1);
    const dayId = await day.getAttribute('data-rollout-id');
    await day.click();
    const dayHead = page.locator(`[data-testid="rollout-head"][data-rollout-id="${dayId}"]`);
    await dayHead.waitFor({ state: 'visible' });
    await until('devices committing the good build',
      () => dayHead.locator('.seg[data-status="committed"]').count(), (n) => n >= 1, 180_000);
    const state = await dayHead.getByTestId('rollout-state').textContent();
    assert.ok(['running', 'completed'].includes(state.trim()), `state ${state}`);

    // The faulty build, offered to the devices the good one updated: its canaries fail
    // their health check and roll back, which pauses it.
    const faulty = page.locator('[data-testid="rollout-row"][data-state="paused"]').filter({ hasText: '2.6.0' });
    await until('the faulty build\'s rollout, paused by its canaries', () => faulty.count(), (n) => n === 1, 120_000);
  });

  it('batches page lists the demo\'s batch records and shows one with QC, signatures and its printable record', { timeout: 200_000 }, async () => {
    await page.getByRole('link', { name: 'Batches', exact: true }).click();
    await page.waitForURL((u) => new URL(u).hash === '#/batches');
    await page.getByTestId('batch-table').waitFor({ state: 'visible' });

    // Each hospital's pharmacist starts runs on the devices that accepted its recipe; a
    // run takes about a minute, then the device's signed record arrives.
    const rows = page.getByTestId('batch-row');
    await until('a batch record', () => rows.count(), (n) => n > 0, 180_000);
    const legendTotal = await page.locator('.legend-item').evaluateAll((items) => items.reduce((sum, i) => sum + Number(i.dataset.count), 0));
    assert.equal(legendTotal, await rows.count(), 'the disposition bar counts every listed batch');

    // One of the first hospital's: its version of the recipe is the one Alice Martin
    // authored (each hospital's pharmacist starts its runs and authored its version).
    const ours = rows.filter({ hasText: DEMO_SIGNATURES[0][0] });
    await until('a batch record of the first hospital', () => ours.count(), (n) => n > 0, 180_000);
    const row = ours.first();
    const batchId = await row.getAttribute('data-batch-id');
    await row.click();
    await page.waitForURL((u) => decodeURIComponent(new URL(u).hash) === `#/batches/${batchId}`);
    const detail = page.locator(`[data-testid="batch-detail"][data-batch-id="${batchId}"]`);
    await detail.waitFor({ state: 'visible' });
    const disposition = await detail.getByTestId('batch-disposition').first().textContent();
    assert.match(disposition.trim(), /^(Awaiting release|Failed)$/, 'a new batch waits for QA or failed');

    // Every signature: the recipe's author and approver, the device that recorded it.
    const meanings = await detail.locator('[data-testid="batch-recipe-signature"]').evaluateAll((items) => items.map((li) => li.dataset.meaning));
    assert.deepEqual(meanings.sort(), ['approved', 'authored']);
    assert.equal(await detail.getByTestId('batch-device-signature').count(), 1);
    const qcRows = await detail.getByTestId('batch-qc-row').count();
    const aborted = /aborted/.test(await detail.textContent());
    assert.ok(qcRows === 5 || aborted, `five QC results for a completed run (got ${qcRows})`);

    // The printable record names every signature with its meaning and UTC time.
    const href = await detail.getByTestId('batch-print').getAttribute('href');
    const html = await page.evaluate(async (u) => {
      const res = await fetch(u, { cache: 'no-store' });
      return { status: res.status, type: res.headers.get('content-type'), text: await res.text() };
    }, href);
    assert.equal(html.status, 200);
    assert.match(html.type, /^text\/html/);
    for (const [name, meaning] of DEMO_SIGNATURES) {
      assert.ok(html.text.includes(name), `the printable record names ${name}`);
      assert.ok(html.text.includes(meaning), `and the meaning ${meaning}`);
    }
    assert.match(html.text, new RegExp(UTC_TIME));
    assert.deepEqual(pageErrors, [], 'no script or network errors in the page');
    await shoot('batches.png');
  });

  it('QA signs in and releases or rejects a batch with their password, and the decision is shown', { timeout: 90_000 }, async () => {
    await page.getByTestId('logout').click();
    await page.getByTestId('login-form').waitFor({ state: 'visible' });
    await signIn(login.qaUser, login.qaPassword);
    await page.getByTestId('batch-table').waitFor({ state: 'visible' });

    const row = page.locator('[data-testid="batch-row"]:not([data-disposition="released"]):not([data-disposition="rejected"])').first();
    await row.waitFor({ state: 'visible' });
    const batchId = await row.getAttribute('data-batch-id');
    const passed = (await row.getAttribute('data-disposition')) === 'awaiting_release';
    await row.click();
    const detail = page.locator(`[data-testid="batch-detail"][data-batch-id="${batchId}"]`);
    const form = detail.getByTestId('batch-decision-form');
    await form.waitFor({ state: 'visible' });

    // A wrong password is refused in the server's words, and nothing is signed.
    await form.getByTestId('batch-decision-password').fill('not my password');
    await form.getByTestId(passed ? 'batch-release' : 'batch-reject').click();
    const error = form.getByTestId('batch-decision-error');
    await error.waitFor({ state: 'visible' });
    assert.ok((await error.textContent()).trim().length > 0, 'the refusal says why');
    assert.equal(await detail.getByTestId('batch-decision').count(), 0, 'no decision recorded');
    // Those refusals were provoked on purpose.
    pageErrors.length = 0;

    await form.getByTestId('batch-decision-password').fill(login.qaPassword);
    await form.getByTestId('batch-decision-reason').fill(passed ? '' : 'out of specification');
    await form.getByTestId(passed ? 'batch-release' : 'batch-reject').click();
    const decision = detail.getByTestId('batch-decision');
    await decision.waitFor({ state: 'visible', timeout: 20_000 });
    assert.equal(await decision.getAttribute('data-meaning'), passed ? 'released' : 'rejected');
    assert.match(await decision.textContent(), /Quinn Okafor \(QA\)/);
    assert.equal(await detail.getByTestId('batch-decision-form').count(), 0, 'a decision is final');
    await shoot('batch-decided.png');

    // Back to the operator for the pages that follow.
    await page.getByTestId('logout').click();
    await page.getByTestId('login-form').waitFor({ state: 'visible' });
    await signIn(login.user, login.password);
    await page.getByTestId('whoami').waitFor({ state: 'visible' });
    assert.deepEqual(pageErrors, [], 'no script or network errors in the page');
  });

  it('quality page charts the demo\'s batches, splits them by device, compares devices and cohorts; alerts page lists and acknowledges', { timeout: 420_000 }, async () => {
    // The comparisons are asked before the data can answer them (8 devices and 9
    // batches leave no degrees of freedom); the server refuses those with 409 and the
    // page says why in the panel. Those refusals are expected, anything else is not.
    const refusals = [];
    const onResponse = (res) => {
      if (res.status() === 409) refusals.push(new URL(res.url()).pathname);
    };
    page.on('response', onResponse);

    await page.getByRole('link', { name: 'Quality', exact: true }).click();
    await page.waitForURL((u) => new URL(u).hash === '#/quality');

    // Fleet health: every site, worst first, with a pass-rate meter.
    await until('health rows', () => count('[data-testid="health-row"]'), (n) => n === SITES, 10_000);
    assert.equal(await count('[data-testid="health-row"] [data-testid="pass-meter"]'), SITES);

    // The control chart of PDI (the default metric): points, the centre line and both
    // control limits, the EWMA and CUSUM panels, capability and rule counts beside it.
    const chart = page.getByTestId('control-chart');
    const points = await until('points on the control chart', async () => ((await chart.count()) === 1 ? Number(await chart.getAttribute('data-points')) : 0),
      (n) => n >= 3, 180_000);
    assert.equal(await chart.locator('[data-testid="chart-point"]').count(), points, 'one mark per point');
    for (const line of ['limit-ucl', 'limit-center', 'limit-lcl', 'ewma-line', 'ewma-ucl', 'cusum-upper', 'cusum-lower']) {
      assert.equal(await chart.getByTestId(line).count(), 1, `${line} is drawn`);
    }
    const ucl = Number(await chart.getByTestId('limit-ucl').getAttribute('y1'));
    const cl = Number(await chart.getByTestId('limit-center').getAttribute('y1'));
    const lcl = Number(await chart.getByTestId('limit-lcl').getAttribute('y1'));
    assert.ok(ucl < cl && cl < lcl, `UCL above the centre above LCL (y ${ucl}, ${cl}, ${lcl})`);
    const side = page.getByTestId('chart-side');
    assert.match(await side.textContent(), /Capability/);
    assert.match(await side.textContent(), /Rules fired/);
    // A point that completes a rule is red and says which rule in its tooltip.
    for (const signal of await chart.locator('[data-testid="chart-point"][data-rules]').all()) {
      const rules = (await signal.getAttribute('data-rules')).split(' ');
      const tip = await signal.locator('title').textContent();
      for (const r of rules) assert.ok(tip.includes(r), `the tooltip names ${r}: ${tip}`);
    }

    // A point opens its batch record; Back returns to the chart.
    const point = chart.locator('[data-testid="chart-point"]').last();
    const batchId = await point.getAttribute('data-batch-id');
    await point.click();
    await page.waitForURL((u) => decodeURIComponent(new URL(u).hash) === `#/batches/${batchId}`);
    await page.locator(`[data-testid="batch-detail"][data-batch-id="${batchId}"]`).waitFor({ state: 'visible' });
    await page.goBack();
    await page.waitForURL((u) => new URL(u).hash === '#/quality');
    await chart.waitFor({ state: 'visible' });

    // Split by device: one small chart per device that made batches, most signals first.
    await page.getByTestId('quality-by').selectOption('device');
    await page.waitForURL((u) => new URL(u).hash === '#/quality?by=device');
    const small = page.getByTestId('small-chart');
    await until('small charts', () => small.count(), (n) => n >= 3, 30_000);
    const signals = await small.evaluateAll((cards) => cards.map((c) => Number(c.dataset.signals)));
    assert.deepEqual(signals, [...signals].sort((a, b) => b - a), 'the charts with the most signals come first');
    // A device's chart needs two of its batches for limits; until then its card says so.
    await until('a drawn small chart', () => count('[data-testid="small-chart"] [data-testid="small-chart-svg"]'), (n) => n >= 1, 180_000);
    assert.equal(await count('[data-testid="small-chart"] [data-testid="small-chart-svg"], [data-testid="small-chart"] [data-testid="small-chart-note"]'),
      await small.count(), 'every card has a chart or says why not');

    // Drill down: the site with batches → its devices → one device's chart.
    // Rows carry their pass rate only when the site made batches.
    const site = await page.locator('[data-testid="health-row"][data-pass-rate]').first().getAttribute('data-site-id');
    await page.locator(`[data-testid="health-row"][data-site-id="${site}"]`).click();
    await page.waitForURL((u) => new URLSearchParams(new URL(u).hash.split('?')[1]).get('site') === site);
    await until('devices of the site', () => count('[data-testid="site-device"]'), (n) => n === DEVICES_PER_SITE, 10_000);
    const first = small.first();
    await first.waitFor({ state: 'visible' });
    const stratum = await first.getAttribute('data-stratum');
    const device = stratum.replace(/^device=/, '');
    await first.click();
    await page.waitForURL((u) => {
      const q = new URLSearchParams(new URL(u).hash.split('?')[1]);
      return q.get('device') === device && q.get('site') === site && !q.get('by');
    });
    // A device with a single batch has no limits yet and says so instead of a chart.
    await until(`the chart of ${device}`, async () => (await chart.count()) + (await count('[data-testid="chart-note"]')), (n) => n === 1, 15_000);
    assert.match(await page.getByTestId('quality-scope').textContent(), new RegExp(literal(device)));
    if ((await chart.count()) === 1) {
      const devices = await chart.locator('[data-testid="chart-point"]').evaluateAll((pts) => pts.map((p) => p.querySelector('title').textContent));
      assert.ok(devices.every((t) => t.includes(device)), `every point on ${device}'s chart is one of its batches`);
    }

    // Which device differs: the adjusted comparison of PDI, as a table with intervals.
    await page.getByTestId('compare-by').selectOption('device');
    const compareRows = page.getByTestId('compare-row');
    await until('comparison table', () => compareRows.count(), (n) => n >= 2, 240_000);
    assert.equal(await page.locator('[data-testid="compare-row"] svg.ci-bar').count(), await compareRows.count(), 'each level has its interval');
    assert.match(await page.getByTestId('compare-verdict').textContent(), /device differs/i);
    assert.ok((await page.getByTestId('compare-summary').textContent()).trim().length > 0, 'the summary sentence is shown');

    // Cohort gate: one device against all the others.
    await page.getByTestId('gate-factor').selectOption('device');
    const gateA = page.getByTestId('gate-a');
    await until('cohort A choices', () => gateA.locator('option').count(), (n) => n >= 2, 15_000);
    const verdict = page.getByTestId('gate-verdict');
    await verdict.waitFor({ state: 'visible', timeout: 20_000 });
    assert.match(await verdict.getAttribute('data-verdict'), /^VERDICT_(REGRESSED|NO_REGRESSION|INSUFFICIENT_DATA)$/);
    await until('gate evidence rows', () => count('[data-testid="gate-row"]'), (n) => n >= 1, 10_000);
    await shoot('quality.png');

    page.off('response', onResponse);
    assert.ok(refusals.every((u) => /\/api\/quality\/(compare|gate)$/.test(u)), `only comparisons were refused: ${refusals.join(', ')}`);
    const unexpected = pageErrors.filter((e) => !/status of 409/.test(e));
    assert.deepEqual(unexpected, [], 'no script or network errors in the page');
    pageErrors.length = 0;

    // Alerts: the list renders whether or not the demo raised any yet.
    await page.getByRole('link', { name: 'Alerts', exact: true }).click();
    await page.waitForURL((u) => new URL(u).hash === '#/alerts');
    await page.getByTestId('alert-table').waitFor({ state: 'visible' });
    await until('alert rows or the empty note', async () => (await count('[data-testid="alert-row"]')) + (await count('[data-testid="alerts-empty"]')),
      (n) => n > 0, 10_000);
    await page.getByTestId('alert-state-filter').selectOption('all');
    const rows = await until('alerts in every state', () => count('[data-testid="alert-row"]'), () => true, 5_000);
    const open = page.locator('[data-testid="alert-row"][data-state="open"]').first();
    if ((await open.count()) === 1) {
      // Acknowledge one as the operator: a note is required, then who and the note show.
      const alertId = await open.getAttribute('data-alert-id');
      await open.click();
      const detail = page.locator(`[data-testid="alert-detail"][data-alert-id="${alertId}"]`);
      await detail.getByTestId('alert-evidence').waitFor({ state: 'visible' });
      const form = detail.getByTestId('alert-ack-form');
      await form.getByTestId('alert-ack-submit').click();
      await form.getByTestId('alert-ack-error').waitFor({ state: 'visible' });
      await form.getByTestId('alert-ack-input').fill('browser test: looked at the evidence');
      await form.getByTestId('alert-ack-submit').click();
      await until(`alert ${alertId} acknowledged`, () => detail.getAttribute('data-state'), (st) => st === 'acknowledged', 15_000);
      assert.equal((await detail.getByTestId('alert-ack-by').textContent()).trim(), login.user);
      assert.equal((await detail.getByTestId('alert-ack-note').textContent()).trim(), 'browser test: looked at the evidence');
    } else if (rows > 0) {
      await page.getByTestId('alert-row').first().click();
      await page.getByTestId('alert-detail').waitFor({ state: 'visible' });
    }
    await shoot('alerts.png');
    assert.deepEqual(pageErrors, [], 'no script or network errors in the page');
  });

  it('inventory page shows stock moving with runs, the lots, and the recall acknowledged by every device', { timeout: 360_000 }, async () => {
    await page.getByRole('link', { name: 'Inventory', exact: true }).click();
    await page.waitForURL((u) => new URL(u).hash === '#/inventory');
    // Every hospital holds cartridges of the demo's type, and runs consume them.
    await until('a stock row per hospital', () => count('[data-testid="stock-row"]'), (n) => n >= 3, 60_000);
    await until('consumption from real runs', async () => {
      const rates = await page.locator('[data-testid="stock-row"] td:nth-child(6)').allTextContents();
      return rates.filter((r) => Number(r) > 0).length;
    }, (n) => n >= 1, 240_000);
    for (const lot of ['L2611-A', 'L2611-B', 'L2611-X']) {
      assert.equal(await count(`[data-testid="lot-row"][data-lot="${lot}"]`), 1, `lot ${lot} listed`);
    }
    // Four minutes in, QA recalls the bad lot: every device acknowledges the deny list.
    const deny = page.getByTestId('deny-status');
    await until('the bad lot recalled', () => page.locator('[data-testid="lot-row"][data-lot="L2611-X"]').getAttribute('data-status'),
      (st) => st === 'recalled', 300_000);
    await until('the deny list acknowledged by every device', async () => [
      Number(await deny.getAttribute('data-version')), await deny.getAttribute('data-acked'), await deny.getAttribute('data-total'),
    ], ([v, acked, total]) => v >= 1 && acked !== null && acked === total, 60_000);
    assert.match(await page.getByTestId('deny-acked').textContent(), /of \d+ devices acknowledged/);
    await shoot('inventory.png');
    assert.deepEqual(pageErrors, [], 'no script or network errors in the page');
  });

  it('enroll page creates a token, shows its secret once and lists it as usable', { timeout: 60_000 }, async () => {
    await page.getByRole('link', { name: 'Enroll a device', exact: true }).click();
    await page.waitForURL((u) => new URL(u).hash === '#/enroll');
    await page.getByTestId('enroll-form').waitFor({ state: 'visible' });

    const siteSelect = page.getByTestId('enroll-site');
    const sites = await until(
      'enroll site choices',
      () => siteSelect.locator('option').evaluateAll((opts) => opts.map((o) => o.value).filter(Boolean)),
      (list) => list.length === SITES,
      10_000,
    );
    const site = sites[1];
    await siteSelect.selectOption(site);

    // A refusal from the server is shown next to the form, in the server's words.
    await page.getByTestId('enroll-uses').fill('2');
    await page.getByTestId('enroll-device').fill('NF-BROWSER-01');
    await page.getByTestId('enroll-submit').click();
    const error = page.getByTestId('enroll-error');
    await error.waitFor({ state: 'visible' });
    assert.match(await error.textContent(), /uses = "?2"? is invalid/);
    assert.equal(await page.getByTestId('enroll-secret').count(), 0, 'no secret for a refused request');
    // That 400 was provoked on purpose.
    pageErrors.length = 0;

    await page.getByTestId('enroll-uses').fill('1');
    await page.getByTestId('enroll-device').fill('');
    await page.getByTestId('enroll-reason').fill('browser test');
    await page.getByTestId('enroll-submit').click();
    const secretEl = page.getByTestId('enroll-secret');
    await secretEl.waitFor({ state: 'visible' });
    const secret = (await secretEl.textContent()).trim();
    assert.ok(secret.startsWith('nfe1.'), `secret token ${JSON.stringify(secret)} starts with nfe1.`);
    assert.equal(await error.isVisible(), false, 'the earlier error is gone');
    const command = (await page.getByTestId('enroll-command').textContent()).trim();
    assert.equal(command, `nanofleet-agent enroll --server ${GRPC_PLACEHOLDER} --token ${secret}`);

    const tokenId = await page.getByTestId('enroll-created').getAttribute('data-token-id');
    assert.ok(tokenId, 'the created token is named');
    const row = page.locator(`[data-testid="enroll-tokens"] [data-testid="token-row"][data-token-id="${tokenId}"]`);
    const rowState = await until(
      `token row ${tokenId}`,
      async () => ((await row.count()) === 1
        ? { state: await row.getAttribute('data-state'), site: await row.getAttribute('data-site-id') }
        : null),
      (v) => v != null && v.state === 'usable',
      10_000,
    );
    assert.equal(rowState.site, site);
    assert.equal(await row.getByText(secret).count(), 0, 'the list never shows a secret');
    await shoot('enroll.png');

    // Shown once: leaving the page and coming back does not bring it back.
    await page.getByRole('link', { name: 'Devices', exact: true }).click();
    await page.getByRole('link', { name: 'Enroll a device', exact: true }).click();
    await row.waitFor({ state: 'visible' });
    assert.equal(await page.getByTestId('enroll-secret').count(), 0, 'the secret is not shown again');
    assert.deepEqual(pageErrors, [], 'no script or network errors in the page');
  });

  it('signing out returns to the sign-in form, signing in again to the same page', { timeout: 60_000 }, async () => {
    await page.getByTestId('logout').click();
    await page.getByTestId('login-form').waitFor({ state: 'visible' });
    assert.equal(await page.getByTestId('whoami').isVisible(), false);
    assert.equal(await page.getByTestId('enroll-form').count(), 0, 'the signed-out page keeps no fleet data');
    assert.equal(await apiStatus('api/me'), 401, 'the session cookie is gone');

    await signIn(login.user, login.password);
    await page.getByTestId('enroll-form').waitFor({ state: 'visible' });
    assert.equal(new URL(page.url()).hash, '#/enroll');
    assert.equal(await page.evaluate(() => window.nanofleetTestMark), true, 'the page was never reloaded');
  });

  it('Ctrl-C stops the server cleanly and the dashboard says it is unreachable', { timeout: 60_000 }, async () => {
    assert.ok(server.running, 'server still running before Ctrl-C');
    server.signal('SIGINT');
    const status = await server.waitExit(SHUTDOWN_TIMEOUT_MS);
    assert.ok(status, `server still running ${SHUTDOWN_TIMEOUT_MS / 1000} s after SIGINT\n${server.tail()}`);
    assert.deepEqual(status, { code: 0, signal: null }, `server exit after SIGINT\n${server.tail()}`);

    await until('error banner', () => page.getByTestId('error-banner').isVisible(), (v) => v === true, 10_000);
    await shoot('server-stopped.png');
  });
});
