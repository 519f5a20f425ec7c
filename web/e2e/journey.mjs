// The whole journey as a person makes it, in a real Chromium, on the real
// browser image with the test provider: the first-start link and a new
// password; Providers, Connect; the desktop appears in the page; clicks
// and keys on the noVNC canvas sign in to the remote sign-in page and give
// consent; the page shows Connected; the CLI workspace's terminal runs
// `polydev-testcli whoami` and shows the person's name, and a prompt typed
// into the page streams the test CLI's answer. On the way the
// desktop WebSocket is cut (the session goes on and the page comes back),
// every page is checked with axe-core, and the numbers the issue asks for
// are printed as MEASURE lines.
import {
  BASE, apiInPage, axe, centre, colours, env, findColour, launch, shot, step, until,
} from './lib.mjs';

const LINK = env('POLYDEV_LINK');
const WHO = env('POLYDEV_OIDC_USER');
const PASSWORD = env('POLYDEV_OIDC_PASSWORD');
const ADMIN_PASSWORD = env('POLYDEV_ADMIN_PASSWORD');
const C = colours();

const browser = await launch();
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => {
    step(`page exception: ${e.stack ?? e.message}`);
    problems.push(`page error: ${e.message}`);
  });
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Refused to/.test(m.text())) {
      problems.push(`CSP: ${m.text()}`);
    }
  });
  page.on('console', (m) => step(`page ${m.type()}: ${m.text()}`));
  // What crosses each desktop WebSocket first (for a failure's log).
  page.on('websocket', (ws) => {
    if (!/\/desktop\?/.test(ws.url())) return;
    const id = ws.url().slice(-6);
    let n = 0;
    const show = (dir) => (f) => {
      if (n++ < 12) {
        const p = typeof f.payload === 'string' ? f.payload : f.payload.toString('latin1');
        step(`desktop ws ${id} ${dir} ${p.length} bytes: ${JSON.stringify(p.slice(0, 40))}`);
      }
    };
    step(`desktop ws ${id} opened`);
    ws.on('framesent', show('sent'));
    ws.on('framereceived', show('received'));
    ws.on('socketerror', (e) => step(`desktop ws ${id} error: ${e}`));
    ws.on('close', () => step(`desktop ws ${id} closed`));
  });
  // Every WebSocket the page opens is kept where the test can reach it,
  // so that it can cut the desktop's (injected by the browser, so the
  // page's own policy does not apply to it).
  await context.addInitScript(() => {
    // A function, not a subclass: noVNC checks the socket's prototype
    // holds every WebSocket property, so the page must get the browser's
    // own WebSocket objects.
    const Native = window.WebSocket;
    window.__sockets = [];
    function Tracked(...args) {
      const ws = new Native(...args);
      window.__sockets.push(ws);
      return ws;
    }
    Tracked.prototype = Native.prototype;
    for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) Tracked[k] = Native[k];
    window.WebSocket = Tracked;
  });
  const desktops = async () =>
    page.evaluate(() => window.__sockets.filter((s) => /\/desktop\?/.test(s.url)).length);

  // 1. The first-start link, then a new password.
  step('1. first-start link');
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  let bytes = 0;
  cdp.on('Network.loadingFinished', (e) => {
    bytes += e.encodedDataLength;
  });
  const t0 = Date.now();
  await page.goto(`${BASE()}/#/link/${LINK}`);
  await page.getByTestId('new-password').waitFor({ state: 'visible' });
  await page.getByTestId('new-password').focus();
  const usable = Date.now() - t0;
  console.log(`MEASURE first page load: ${bytes} bytes transferred, usable after ${usable} ms`);
  await shot(page, 'dashboard-1-first-start.png');
  await axe(page, 'set a password (first start)');
  await page.getByTestId('new-password').fill(ADMIN_PASSWORD);
  await page.getByTestId('new-password-repeat').fill(ADMIN_PASSWORD);
  await page.getByTestId('set-password-submit').click();

  // 2. Providers, then Connect.
  step('2. providers');
  const card = page.getByTestId('provider-card-testcli');
  await card.waitFor({ state: 'visible', timeout: 60_000 });
  await until('testcli shows as not connected', 30, async () =>
    /not connected/i.test((await page.getByTestId('provider-state-testcli').textContent()) ?? ''));
  await shot(page, 'dashboard-2-providers.png');
  await axe(page, 'providers');
  const clicked = Date.now();
  await page.getByTestId('connect-testcli').click();
  await page.waitForURL(/#\/sessions\/ses-[0-9a-f]+/);
  const session = page.url().match(/ses-[0-9a-f]+/)[0];
  step(`session ${session}`);
  await axe(page, 'connect session (starting)');

  // 3. The desktop appears in the page.
  step('3. desktop');
  await page.waitForFunction(() => window.__polydev && window.__polydev.desktopFirstFrameAt, null, {
    timeout: 900_000,
    polling: 100,
  });
  console.log(`MEASURE Connect click -> first desktop frame in the page: ${Date.now() - clicked} ms`);
  const signinPage = async () => {
    const b = await findColour(page, C.login_background, 6, 200_000);
    return b && b.w * 10 >= b.fbw * 9 && b.h * 2 >= b.fbh ? b : null;
  };
  await until('the remote sign-in page fills the desktop', 900, signinPage);
  await shot(page, 'dashboard-3-desktop.png');
  if ((await page.getByTestId('desktop-state').textContent()) !== 'connected') {
    throw new Error('the desktop shows but its state is not "connected"');
  }

  // The desktop WebSocket is cut: the session goes on, the page reconnects
  // with a fresh ticket.
  step('cut the desktop WebSocket');
  const before = await desktops();
  await page.evaluate(() => {
    const open = window.__sockets.filter((s) => /\/desktop\?/.test(s.url) && s.readyState === 1);
    if (open.length !== 1) throw new Error(`${open.length} desktop WebSockets are open, not 1`);
    open[0].close(4000, 'cut by the test');
  });
  await until('the page notices the cut', 30, async () =>
    (await page.getByTestId('desktop-state').textContent()) !== 'connected', 50);
  await until('the page reconnects', 120, async () =>
    (await desktops()) > before && (await page.getByTestId('desktop-state').textContent()) === 'connected');
  const still = await apiInPage(page, 'GET', `/api/v1/sessions/${session}`);
  if (still.status !== 200 || still.json.state !== 'awaiting_user') {
    throw new Error(`after the cut the session is ${JSON.stringify(still.json)}`);
  }
  await until('the sign-in page is drawn again', 120, signinPage);
  await axe(page, 'connect session (desktop)');

  // 4. Click and type on the canvas: name, password, then consent.
  step('4. sign in through the canvas');
  const fill = async (colour, text, what) => {
    for (let attempt = 0; attempt < 6; attempt++) {
      const box = await until(`the ${what} field`, 180, () => findColour(page, colour, 8, 500));
      const at = centre(box);
      await page.mouse.click(at.x, at.y);
      await page.keyboard.press('Control+a');
      await page.keyboard.press('Backspace');
      await page.keyboard.type(text, { delay: 30 });
      try {
        await until(`the ${what} field shows the typed text`, 20, async () => {
          const b = await findColour(page, colour, 8, 500);
          return b && b.dark >= 40 * Math.min(text.length, 8);
        }, 300);
        return;
      } catch {
        step(`the ${what} field did not show the text; typing again`);
      }
    }
    throw new Error(`could not type into the ${what} field`);
  };
  await fill(C.username_input, WHO, 'user name');

  // Key press on the canvas → its echo drawn back (the remote field).
  const echoes = [];
  for (let i = 0; i < 5; i++) {
    const box = await findColour(page, C.username_input, 8, 500);
    const start = Date.now();
    await page.keyboard.press('x');
    await until('the key is echoed', 30, async () => {
      const b = await findColour(page, C.username_input, 8, 500);
      return b && b.dark > box.dark;
    }, 10);
    echoes.push(Date.now() - start);
    await page.keyboard.press('Backspace');
    await until('the echo is erased', 30, async () => {
      const b = await findColour(page, C.username_input, 8, 500);
      return b && b.dark <= box.dark;
    }, 10);
  }
  echoes.sort((a, b) => a - b);
  console.log(`MEASURE key press on the canvas -> echo drawn: median ${echoes[2]} ms (min ${echoes[0]}, max ${echoes[4]}; ${echoes.join(', ')})`);

  await fill(C.password_input, PASSWORD, 'password');
  await page.keyboard.press('Enter');
  const allow = await until('the consent page', 300, async () => {
    if (!(await findColour(page, C.consent_background, 6, 100_000))) return null;
    if (!(await findColour(page, C.deny_button, 8, 500))) return null;
    return findColour(page, C.allow_button, 8, 500);
  });
  await shot(page, 'dashboard-4-consent.png');
  const a = centre(allow);
  await page.mouse.click(a.x, a.y);

  // 5. The page shows Connected.
  step('5. connected');
  await until('the page shows Connected', 900, async () =>
    /Connected/.test((await page.getByTestId('session-status').textContent()) ?? ''), 1000);
  await shot(page, 'dashboard-5-connected.png');
  await axe(page, 'connect session (completed)');

  // 6. The CLI workspace: `polydev-testcli whoami` in the terminal.
  step('6. workspace');
  await page.getByTestId('nav-workspace').click();
  await until('the CLI VM runs', 600, async () =>
    ((await page.getByTestId('vm-state').textContent()) ?? '').includes('running'), 1000);
  await until('the terminal connects', 120, async () =>
    (await page.getByTestId('terminal-state').textContent()) === 'connected');
  await page.getByTestId('terminal').click();
  await page.keyboard.type('polydev-testcli whoami\n', { delay: 20 });
  const rows = page.getByTestId('terminal').locator('.xterm-rows');
  await until(`the terminal shows ${WHO}`, 120, async () => {
    const text = (await rows.innerText()) ?? '';
    return new RegExp(`\\b${WHO}\\b`).test(text.split('whoami').slice(1).join(''));
  });
  await shot(page, 'dashboard-6-whoami.png');
  await axe(page, 'CLI workspace');

  // The terminal is kept: a reload attaches to the same shell and its
  // screen comes back (nothing typed since); a second tab is another shell.
  await page.keyboard.type('echo shell-$((6*7))-one\n', { delay: 20 });
  await until('the first shell answers', 60, async () => ((await rows.innerText()) ?? '').includes('shell-42-one'));
  const reloaded = Date.now();
  await page.reload();
  await until('the terminal reconnects after a reload', 120, async () =>
    (await page.getByTestId('terminal-state').textContent()) === 'connected');
  await until('the restored screen shows the earlier output', 60, async () => {
    const text = (await page.getByTestId('terminal').locator('.xterm-rows').innerText()) ?? '';
    return text.includes('shell-42-one') && new RegExp(`\\b${WHO}\\b`).test(text);
  });
  console.log(`measure: reload to the restored terminal screen ${Date.now() - reloaded} ms`);
  await page.getByTestId('terminal-add').click();
  await until('the second terminal connects', 120, async () =>
    (await page.getByTestId('terminal-state').textContent()) === 'connected');
  const second = page.getByTestId('terminal').locator('.xterm-rows');
  if (((await second.innerText()) ?? '').includes('shell-42-one')) throw new Error('the new tab shows the first shell');
  await page.getByTestId('terminal').click();
  await page.keyboard.type('exit 3\n', { delay: 20 });
  await until('the second shell ends', 60, async () =>
    (await page.getByTestId('terminal-state').textContent()) === 'ended');
  await page.getByTestId('terminal-remove').click();
  await until('back on the first terminal', 120, async () =>
    ((await page.getByTestId('terminal').locator('.xterm-rows').innerText()) ?? '').includes('shell-42-one'));
  await axe(page, 'CLI workspace with tabs');

  // 7. A prompt from the page: the test CLI's answer streams in.
  step('7. prompt');
  await page.getByTestId('run-prompt').fill('what is six times seven?');
  const asked = Date.now();
  await page.getByTestId('run-submit').click();
  await until('the prompt answers', 180, async () =>
    ((await page.getByTestId('run-output').textContent()) ?? '').includes('Here is the answer: 42.'));
  console.log(`measure: prompt submit to its answer on the page ${Date.now() - asked} ms`);
  await until('the run succeeds', 60, async () =>
    ((await page.getByTestId('run-state').textContent()) ?? '').includes('succeeded'));
  await page.getByTestId('runs').getByText('what is six times seven?').first().waitFor({ state: 'visible' });
  await page.getByTestId('run-output').scrollIntoViewIfNeeded();
  await shot(page, 'dashboard-6-prompt.png');
  await axe(page, 'CLI workspace with a prompt run');

  // The rest of the pages an administrator has, each checked.
  for (const [nav, testid, what] of [
    ['nav-tokens', 'token-name', 'API tokens'],
    ['nav-admin', 'admin-users', 'admin'],
  ]) {
    await page.getByTestId(nav).click();
    await page.getByTestId(testid).first().waitFor({ state: 'visible' });
    await axe(page, what);
  }
  for (const [hash, testid] of [
    ['/admin/vms', 'admin-vms'],
    ['/admin/sessions', 'admin-sessions'],
    ['/admin/upstreams', 'admin-upstreams'],
    ['/admin/metrics', 'admin-metrics'],
  ]) {
    await page.goto(`${BASE()}/#${hash}`);
    await page.getByTestId(testid).first().waitFor({ state: 'visible' });
    await axe(page, `admin ${hash}`);
  }
  await shot(page, 'dashboard-7-admin-metrics.png');
  if (problems.length) throw new Error(problems.join('\n'));
  // Hand the session id to the access test through stdout.
  console.log(`SESSION ${session}`);
  step('journey done');
} finally {
  await browser.close();
}
