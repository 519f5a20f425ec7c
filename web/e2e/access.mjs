// Who sees what, in a real Chromium: a second user cannot see the first
// user's session; admin pages need the admin role; a cookie whose login
// ended sends the page to sign-in; and a page of another origin cannot
// change anything with the user's cookie (state changes need JSON, which
// it cannot send without a CORS preflight the API never grants).
import { createServer } from 'node:http';
import {
  BASE, apiInPage, axe, env, launch, shot, step, until,
} from './lib.mjs';

const ADMIN_PASSWORD = env('POLYDEV_ADMIN_PASSWORD');
const OTHER_SESSION = env('POLYDEV_OTHER_SESSION');
const BOB_PASSWORD = 'bob-has-a-long-passphrase-' + Math.random().toString(36).slice(2);
const BOB_NEW = 'bob-changed-it-to-this-one-' + Math.random().toString(36).slice(2);

async function signIn(page, name, password) {
  await page.goto(`${BASE()}/#/signin`);
  await page.getByTestId('signin-name').fill(name);
  await page.getByTestId('signin-password').fill(password);
  await page.getByTestId('signin-submit').click();
  await page.getByTestId('nav-providers').waitFor({ state: 'visible' });
}

const browser = await launch();
try {
  // The administrator makes bob an account.
  const adminCtx = await browser.newContext();
  const admin = await adminCtx.newPage();
  await signIn(admin, 'admin', ADMIN_PASSWORD);
  const made = await apiInPage(admin, 'POST', '/api/v1/admin/users', { name: 'bob', password: BOB_PASSWORD });
  if (made.status !== 201) throw new Error(`creating bob: ${JSON.stringify(made)}`);

  // Sign-in page: a wrong password says so and stays.
  const bobCtx = await browser.newContext();
  const bob = await bobCtx.newPage();
  await bob.goto(`${BASE()}/#/signin`);
  await axe(bob, 'sign in');
  await bob.getByTestId('signin-name').fill('bob');
  await bob.getByTestId('signin-password').fill('not the password at all');
  await bob.getByTestId('signin-submit').click();
  await bob.getByRole('alert').first().waitFor({ state: 'visible' });
  await signIn(bob, 'bob', BOB_PASSWORD);

  // A second user cannot see the first user's session.
  step("bob opens the admin's session");
  await bob.goto(`${BASE()}/#/sessions/${OTHER_SESSION}`);
  await bob.getByRole('alert').first().waitFor({ state: 'visible' });
  const text = await bob.locator('main').innerText();
  // Answered exactly like a session that does not exist.
  if (!/no session "[^"]+" of yours|not found/i.test(text)) {
    throw new Error(`bob sees on the admin's session page: ${text}`);
  }
  if (await bob.getByTestId('desktop').count()) throw new Error("bob's page shows a desktop for someone else's session");
  const theirs = await apiInPage(bob, 'GET', `/api/v1/sessions/${OTHER_SESSION}`);
  if (theirs.status !== 404) throw new Error(`the API gave bob ${theirs.status}`);
  const mine = await apiInPage(bob, 'GET', '/api/v1/sessions');
  if (mine.status !== 200 || mine.json.length !== 0) throw new Error(`bob's sessions: ${JSON.stringify(mine)}`);
  await shot(bob, 'dashboard-access-1-not-yours.png');

  // Admin pages need the admin role.
  step('bob opens the admin pages');
  if (await bob.getByTestId('nav-admin').count()) throw new Error('bob has an Admin link');
  for (const tab of ['users', 'vms', 'sessions', 'upstreams', 'metrics']) {
    await bob.goto(`${BASE()}/#/admin/${tab}`);
    await bob.getByTestId('admin-denied').waitFor({ state: 'visible' });
    if (await bob.getByTestId(`admin-${tab}`).count()) throw new Error(`bob sees admin-${tab}`);
  }
  for (const path of ['/api/v1/admin/users', '/api/v1/admin/vms', '/api/v1/admin/sessions/summary', '/metrics']) {
    const r = await apiInPage(bob, 'GET', path);
    if (r.status !== 403) throw new Error(`bob got ${r.status} from ${path}`);
  }
  await shot(bob, 'dashboard-access-2-admin-denied.png');

  // A page of another origin, with bob's cookie (same site: another port
  // of the same address), tries to start a session for him.
  step('another origin tries to act for bob');
  const evil = createServer((req, res) => {
    res.setHeader('content-type', 'text/html');
    res.end(`<!doctype html><html lang="en"><body>
<iframe name="sink" title="sink"></iframe>
<form id="f" method="POST" action="${BASE()}/api/v1/sessions" enctype="text/plain" target="sink">
<input name='{"provider":"testcli","x":"' value='"}'></form>
<script>
window.results = {};
document.getElementById('f').submit();
fetch('${BASE()}/api/v1/sessions', { method: 'POST', credentials: 'include',
  headers: { 'content-type': 'application/json' }, body: '{"provider":"testcli"}' })
  .then((r) => { window.results.json = 'status ' + r.status; })
  .catch((e) => { window.results.json = 'blocked: ' + e.message; });
fetch('${BASE()}/api/v1/tokens', { method: 'POST', credentials: 'include', mode: 'no-cors',
  headers: { 'content-type': 'text/plain' }, body: '{"name":"x","scopes":["sessions:write"]}' })
  .then(() => { window.results.plain = 'sent'; })
  .catch((e) => { window.results.plain = 'blocked: ' + e.message; });
</script></body></html>`);
  });
  await new Promise((r) => evil.listen(0, '127.0.0.1', r));
  const evilUrl = `http://127.0.0.1:${evil.address().port}/`;
  const attack = await bobCtx.newPage();
  const answers = [];
  attack.on('response', (r) => {
    if (r.url().startsWith(BASE())) answers.push(`${r.request().method()} ${r.url()} ${r.status()}`);
  });
  await attack.goto(evilUrl);
  await attack.waitForFunction(() => window.results && window.results.json && window.results.plain, null, { timeout: 30_000 });
  const results = await attack.evaluate(() => window.results);
  step(`from ${evilUrl}: ${JSON.stringify(results)}; answers: ${answers.join('; ')}`);
  if (!/^blocked/.test(results.json)) throw new Error(`a cross-origin JSON request went through: ${results.json}`);
  await until('the form post is answered', 30, async () => answers.some((a) => a.startsWith('POST') && / 415$/.test(a)));
  evil.close();
  const after = await apiInPage(bob, 'GET', '/api/v1/sessions');
  if (after.json.length !== 0) throw new Error(`another origin made bob a session: ${JSON.stringify(after.json)}`);
  const tokens = await apiInPage(bob, 'GET', '/api/v1/tokens');
  if (tokens.json.length !== 0) throw new Error(`another origin made bob a token: ${JSON.stringify(tokens.json)}`);

  // A cookie whose login ended sends the page to sign-in: bob signs in a
  // second time elsewhere and changes his password, which ends every
  // login of his, this one's included.
  step("bob's other login changes the password");
  const elsewhere = await (await browser.newContext()).newPage();
  await signIn(elsewhere, 'bob', BOB_PASSWORD);
  await elsewhere.getByTestId('nav-account').click();
  await axe(elsewhere, 'account');
  await elsewhere.getByTestId('current-password').fill(BOB_PASSWORD);
  await elsewhere.getByTestId('new-password').fill(BOB_NEW);
  await elsewhere.getByTestId('new-password-repeat').fill(BOB_NEW);
  await elsewhere.getByTestId('set-password-submit').click();
  await until('the password change is done', 30, async () => {
    const r = await apiInPage(bob, 'GET', '/api/v1/me');
    return r.status === 401;
  });
  await bob.getByTestId('nav-tokens').click();
  await bob.waitForURL(/#\/signin/, { timeout: 30_000 });
  await bob.getByTestId('signin-name').waitFor({ state: 'visible' });
  await shot(bob, 'dashboard-access-3-signed-out.png');
  await signIn(bob, 'bob', BOB_NEW);
  step('access done');
} finally {
  await browser.close();
}
