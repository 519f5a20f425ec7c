// A real OpenID Connect provider (panva/oidc-provider) that a CLI signs in
// against through a browser, the way Codex and Gemini CLI do: authorization
// code + PKCE S256 to a loopback redirect, refresh tokens that rotate.
// Started by crates/testcli/tests/signin.rs (and the desktop e2e tests).
// Loopback only.
//
//   node signin.js --port <n|0> --issuer https://auth.polydev.test \
//     --tls-cert <pem> --tls-key <pem> --keys <jwks file> --users <users.json>
//
// * Serves HTTPS on 127.0.0.1:<port> (0 = any free port) with the given
//   certificate; the test made it (and its CA) at run time. The issuer is
//   --issuer: clients reach it through an HTTP CONNECT proxy that maps the
//   issuer's host to this port, since nothing resolves that name. Prints one
//   line `listening https://127.0.0.1:<port>` once it accepts connections.
// * Signing keys live in --keys (a private JWK set in the test's temp dir),
//   generated (mode 0600) when missing, as server.js does. Never committed.
// * --users is a JSON object {"alice": "<password>", ...}, written by the test
//   with generated passwords.
// * One public native client, `polydev-testcli`: no client secret, PKCE S256
//   required (oidc-provider knows no other method), redirect URI
//   http://127.0.0.1/callback on any port (RFC 8252 §7.3: oidc-provider
//   ignores the port of loopback redirect URIs for native clients), scopes
//   openid profile offline_access; a refresh token is issued when
//   offline_access is consented to (prompt=consent).
// * Refresh tokens rotate on every use. Presenting a used one again is
//   refused with invalid_grant and revokes the whole grant: its newest
//   refresh token and its access tokens stop working (oidc-provider does this
//   for consumed refresh tokens; the log line `refresh_reuse` records it).
// * The sign-in and consent pages are ours (devInteractions is off). A test
//   that only sees pixels over VNC drives them, so every page and control is
//   a solid rectangle of a distinctive colour listed in signin-colours.json:
//   no gradients, shadows, borders or rounded corners, no JavaScript, no
//   external resources.
// * Logs one JSON object per line on stdout for each event, with the TCP
//   peer address (`peer`) so a test can tell which proxy a request came
//   through: login_page, login_ok, login_failed, consent_ok, consent_denied,
//   token, token_refused, refresh_reuse, userinfo, revocation,
//   authorization_refused. Passwords,
//   codes and tokens are never logged.
// * SIGTERM: stops listening and exits 0.

import { generateKeyPairSync, randomBytes, timingSafeEqual, createHash } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:https';
import Provider from 'oidc-provider';

const here = new URL('.', import.meta.url);
const colours = JSON.parse(readFileSync(new URL('signin-colours.json', here), 'utf8'));

function arg(name) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const usage = 'usage: node signin.js --port <n|0> --issuer <https url> --tls-cert <pem> --tls-key <pem> --keys <jwks file> --users <users.json>';
const port = Number.parseInt(arg('--port') ?? '0', 10);
const issuer = arg('--issuer');
const certFile = arg('--tls-cert');
const keyFile = arg('--tls-key');
const keysFile = arg('--keys');
const usersFile = arg('--users');
if (!Number.isInteger(port) || port < 0 || port > 65535 || !issuer || !certFile || !keyFile || !keysFile || !usersFile) {
  console.error(usage);
  process.exit(2);
}
if (!issuer.startsWith('https://')) {
  console.error(`--issuer must be an https URL, not ${issuer}`);
  process.exit(2);
}

const users = JSON.parse(readFileSync(usersFile, 'utf8'));
if (typeof users !== 'object' || users === null || Array.isArray(users)
  || !Object.values(users).every((p) => typeof p === 'string')) {
  console.error(`${usersFile} must be a JSON object of user name to password`);
  process.exit(2);
}

let keys = existsSync(keysFile) ? JSON.parse(readFileSync(keysFile, 'utf8')).keys : [];
if (keys.length === 0) {
  const stamp = randomBytes(6).toString('hex');
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  keys = [
    { ...rsa, kid: `rsa-${stamp}`, use: 'sig', alg: 'RS256' },
    { ...ec, kid: `ec-${stamp}`, use: 'sig', alg: 'ES256' },
  ];
  writeFileSync(keysFile, JSON.stringify({ keys }), { mode: 0o600 });
}

function log(event, peer, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, peer, ...fields })}\n`);
}

// Compares digests so that neither the length nor the content of the stored
// password leaks through timing.
function passwordMatches(user, password) {
  if (!Object.hasOwn(users, user)) return false;
  const digest = (s) => createHash('sha256').update(s, 'utf8').digest();
  return timingSafeEqual(digest(users[user]), digest(password));
}

function displayName(user) {
  return user.charAt(0).toUpperCase() + user.slice(1);
}

const scopeText = {
  openid: 'Sign you in (openid)',
  profile: 'Read your name and user name (profile)',
  offline_access: 'Stay signed in (offline_access)',
};

const provider = new Provider(issuer, {
  clients: [{
    client_id: 'polydev-testcli',
    client_name: 'Polydev Test CLI',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback'],
    scope: 'openid profile offline_access',
  }],
  jwks: { keys },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  scopes: ['openid', 'profile', 'offline_access'],
  claims: { openid: ['sub'], profile: ['name', 'preferred_username'] },
  async findAccount(_ctx, id) {
    if (!Object.hasOwn(users, id)) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, name: displayName(id) };
      },
    };
  },
  // Public client: PKCE is required; oidc-provider only implements S256, so
  // `plain` is refused at the authorization endpoint.
  pkce: { required: () => true },
  // Every refresh rotates, so that a reused one is always detectable.
  rotateRefreshToken: true,
  issueRefreshToken: async (_ctx, client, code) => client.grantTypeAllowed('refresh_token')
    && code.scopes.has('offline_access'),
  features: {
    devInteractions: { enabled: false },
    revocation: { enabled: true },
    userinfo: { enabled: true },
  },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  ttl: {
    AccessToken: 600,
    AuthorizationCode: 60,
    IdToken: 600,
    RefreshToken: 30 * 24 * 60 * 60,
    Interaction: 60 * 60,
    Session: 24 * 60 * 60,
    Grant: 30 * 24 * 60 * 60,
  },
});

// Token, userinfo and revocation events, logged once the provider answered
// (so the status and the grant's account are known).
provider.on('grant.error', (ctx, err) => {
  ctx.state.polydevDetail = err.error_detail;
  if (err.error_detail === 'refresh token already used') {
    log('refresh_reuse', ctx.req.socket.remoteAddress, {
      user: ctx.oidc?.entities?.Account?.accountId,
      grant_revoked: true,
    });
  }
});

// Refused authorization requests (PKCE missing or plain, a foreign
// redirect URI): the error only, the request may hold anything.
provider.on('authorization.error', (ctx, err) => {
  log('authorization_refused', ctx.req.socket.remoteAddress, {
    error: err.error,
    error_description: err.error_description,
  });
});

provider.use(async (ctx, next) => {
  await next();
  const route = ctx.oidc?.route;
  const peer = ctx.req.socket.remoteAddress;
  const user = ctx.oidc?.entities?.Account?.accountId;
  if (route === 'token') {
    const grantType = ctx.oidc.params?.grant_type;
    if (ctx.status === 200) {
      log('token', peer, { grant_type: grantType, user });
    } else {
      log('token_refused', peer, {
        grant_type: grantType,
        user,
        status: ctx.status,
        error: ctx.body?.error,
        error_description: ctx.body?.error_description,
        detail: ctx.state.polydevDetail,
      });
    }
  } else if (route === 'userinfo') {
    log('userinfo', peer, { status: ctx.status, user, error: ctx.body?.error });
  } else if (route === 'revocation') {
    log('revocation', peer, { status: ctx.status });
  }
});

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// Solid fills only: every control is a rectangle of one colour with no
// border, outline, shadow or radius, so a pixel test can take the bounding
// box of its colour. Text inside is black or white for contrast.
function page(title, background, body) {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${escapeHtml(title)}</title>
<style>
* { box-sizing: border-box; margin: 0; border: 0; border-radius: 0; box-shadow: none; outline: none; background-image: none; }
html, body { background: ${background}; color: #ffffff; font: 22px sans-serif; min-height: 100%; }
main { width: 640px; margin: 48px auto; }
h1 { font-size: 36px; margin-bottom: 24px; }
p, li, label { margin-bottom: 12px; }
ul { margin: 0 0 24px 32px; }
input { display: block; width: 100%; height: 64px; padding: 0 16px; margin-bottom: 24px; font: 26px sans-serif; color: #000000; -webkit-appearance: none; appearance: none; }
input:focus { outline: none; }
button { display: block; width: 100%; height: 80px; margin-bottom: 24px; font: bold 28px sans-serif; cursor: pointer; -webkit-appearance: none; appearance: none; }
#username { background: ${colours.username_input}; }
#password { background: ${colours.password_input}; }
#submit { background: ${colours.submit_button}; color: #000000; }
#allow { background: ${colours.allow_button}; color: #000000; }
#deny { background: ${colours.deny_button}; color: #ffffff; }
#error { background: ${colours.error_banner}; color: #ffffff; padding: 20px 16px; margin-bottom: 24px; font-weight: bold; }
</style></head>
<body><main>${body}</main></body></html>`;
}

// After a wrong password the page comes back exactly as the first time
// (empty fields, focus on the user name) plus the banner, so a pixel-driven
// test repeats the same clicks and keystrokes.
function loginPage(uid, { error } = {}) {
  const banner = error ? `<div id="error" role="alert">${escapeHtml(error)}</div>` : '';
  return page('Sign in - Polydev Test Identity', colours.login_background, `
<h1>Sign in to Polydev Test Identity</h1>
${banner}
<form method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<label for="username">User name</label>
<input id="username" name="username" type="text" autofocus autocomplete="off" autocapitalize="none" spellcheck="false">
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="off">
<button id="submit" type="submit">Sign in</button>
</form>`);
}

function consentPage(uid, clientName, scopes) {
  const items = scopes.map((s) => `<li>${escapeHtml(scopeText[s] ?? s)}</li>`).join('');
  return page('Allow access - Polydev Test Identity', colours.consent_background, `
<h1>Allow ${escapeHtml(clientName)}?</h1>
<p><strong>${escapeHtml(clientName)}</strong> asks to:</p>
<ul>${items}</ul>
<form method="post" action="/interaction/${escapeHtml(uid)}/confirm">
<button id="allow" type="submit">Allow</button>
</form>
<form method="post" action="/interaction/${escapeHtml(uid)}/deny">
<button id="deny" type="submit">Deny</button>
</form>`);
}

function sendHtml(res, status, html) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  // No scripts, no external loads. form-action stays unrestricted: Chromium
  // applies it to the redirect chain that ends at the client's loopback URI.
  res.setHeader('Content-Security-Policy', "default-src 'none'; style-src 'unsafe-inline'");
  res.end(html);
}

const maxForm = 16 * 1024;
function readForm(req) {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks = [];
    req.on('data', (c) => {
      size += c.length;
      if (size > maxForm) {
        reject(new Error('form too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(new URLSearchParams(Buffer.concat(chunks).toString('utf8'))));
    req.on('error', reject);
  });
}

// The interaction pages: /interaction/<uid> shows the page the pending
// prompt needs; /login, /confirm and /deny take its forms.
async function interaction(req, res, path) {
  const peer = req.socket.remoteAddress;
  const [, , uid, action] = path.split('/');
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    sendHtml(res, 400, page('Error', colours.login_background, '<h1>This sign-in link does not match your session</h1>'));
    return;
  }
  const { prompt, params } = details;
  const client = await provider.Client.find(params.client_id);
  const clientName = client?.clientName ?? params.client_id;

  if (req.method === 'GET' && action === undefined) {
    if (prompt.name === 'login') {
      log('login_page', peer);
      sendHtml(res, 200, loginPage(uid));
    } else {
      sendHtml(res, 200, consentPage(uid, clientName, String(params.scope ?? '').split(' ').filter(Boolean)));
    }
    return;
  }
  if (req.method !== 'POST') {
    res.statusCode = 405;
    res.end();
    return;
  }
  const form = await readForm(req);

  if (action === 'login' && prompt.name === 'login') {
    const user = form.get('username') ?? '';
    if (!passwordMatches(user, form.get('password') ?? '')) {
      log('login_failed', peer, { user });
      sendHtml(res, 200, loginPage(uid, { error: 'Wrong username or password' }));
      return;
    }
    log('login_ok', peer, { user });
    await provider.interactionFinished(req, res, { login: { accountId: user } }, { mergeWithLastSubmission: false });
    return;
  }

  if (action === 'confirm' && prompt.name === 'consent') {
    const { accountId } = details.session;
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    log('consent_ok', peer, { user: accountId, scope: params.scope });
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }

  if (action === 'deny' && prompt.name === 'consent') {
    log('consent_denied', peer, { user: details.session?.accountId });
    await provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: 'The user denied access',
    }, { mergeWithLastSubmission: false });
    return;
  }

  sendHtml(res, 400, page('Error', colours.login_background, '<h1>This form does not belong to the current step</h1>'));
}

const callback = provider.callback();
const server = createServer({ cert: readFileSync(certFile), key: readFileSync(keyFile) }, (req, res) => {
  const path = new URL(req.url, issuer).pathname;
  if (path.startsWith('/interaction/')) {
    interaction(req, res, path).catch((e) => {
      // An expired or unknown interaction (SessionNotFound) is the user's
      // problem, anything else ours; neither reveals internals.
      const status = e.statusCode ?? 500;
      if (status >= 500) console.error(`interaction failed: ${e.stack ?? e}`);
      if (!res.headersSent) {
        sendHtml(res, status, page('Error', colours.login_background, `<h1>Sign-in failed</h1><p>${escapeHtml(e.error_description ?? e.message ?? 'error')}</p>`));
      } else {
        res.end();
      }
    });
    return;
  }
  callback(req, res);
});
server.listen(port, '127.0.0.1', () => {
  console.log(`listening https://127.0.0.1:${server.address().port}`);
});
server.on('error', (e) => {
  console.error(`cannot listen on 127.0.0.1:${port}: ${e.message}`);
  process.exit(1);
});
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  // Keep-alive connections would hold close() open; end them.
  server.closeAllConnections();
});
