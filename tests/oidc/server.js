// A real OpenID Connect provider (panva/oidc-provider) for the controller's
// JWT tests (crates/controller/tests/auth.rs). Loopback only.
//
//   OIDC_CLIENT_SECRET=<secret> node server.js --port <n|0> --keys <file> [--rotate]
//
// * Listens on 127.0.0.1:<port> (0 = any free port); the issuer is
//   http://127.0.0.1:<port>, the JWKS is at /jwks. Prints one line
//   `listening http://127.0.0.1:<port>` once it accepts connections.
// * Signing keys live in <file> (a private JWK set the test's temp dir
//   holds). Missing: one RSA and one P-256 key are generated. --rotate puts a
//   new pair in front (new tokens use it; the old keys stay published).
//   Keys are made at run time and never committed.
// * One client, `polydev-test`, may use client_credentials with the secret
//   from the environment. Resource indicators pick what is issued (all JWT
//   access tokens):
//     urn:polydev:api        aud polydev-api, RS256, 600 s
//     urn:polydev:api:es256  aud polydev-api, ES256, 600 s
//     urn:polydev:api:short  aud polydev-api, RS256, 1 s
//     urn:other:api          aud other-api,   RS256, 600 s

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider, { errors } from 'oidc-provider';

function arg(name) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const port = Number.parseInt(arg('--port') ?? process.env.OIDC_PORT ?? '0', 10);
const keysFile = arg('--keys') ?? process.env.OIDC_KEYS;
const secret = process.env.OIDC_CLIENT_SECRET;
if (!Number.isInteger(port) || port < 0 || port > 65535 || !keysFile || !secret) {
  console.error('usage: OIDC_CLIENT_SECRET=<secret> node server.js --port <n|0> --keys <file> [--rotate]');
  process.exit(2);
}

function newKeys() {
  const stamp = randomBytes(6).toString('hex');
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  return [
    { ...rsa, kid: `rsa-${stamp}`, use: 'sig', alg: 'RS256' },
    { ...ec, kid: `ec-${stamp}`, use: 'sig', alg: 'ES256' },
  ];
}

let keys = existsSync(keysFile) ? JSON.parse(readFileSync(keysFile, 'utf8')).keys : [];
if (keys.length === 0 || process.argv.includes('--rotate')) {
  keys = [...newKeys(), ...keys];
  writeFileSync(keysFile, JSON.stringify({ keys }), { mode: 0o600 });
}

const resources = {
  'urn:polydev:api': { audience: 'polydev-api', alg: 'RS256', ttl: 600 },
  'urn:polydev:api:es256': { audience: 'polydev-api', alg: 'ES256', ttl: 600 },
  'urn:polydev:api:short': { audience: 'polydev-api', alg: 'RS256', ttl: 1 },
  'urn:other:api': { audience: 'other-api', alg: 'RS256', ttl: 600 },
};
const scope = 'sessions:read sessions:write vms:read vms:write streams:connect';

function start(listenPort) {
  const issuer = `http://127.0.0.1:${listenPort}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: 'polydev-test',
      client_secret: secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    jwks: { keys },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'urn:polydev:api',
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, indicator) => {
          const r = resources[indicator];
          if (!r) throw new errors.InvalidTarget();
          return {
            scope,
            audience: r.audience,
            accessTokenTTL: r.ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: r.alg } },
          };
        },
      },
    },
  });
  return provider;
}

// Port 0: bind first to learn the port, since the issuer URL contains it.
const server = createServer();
server.listen(port, '127.0.0.1', () => {
  const actual = server.address().port;
  const provider = start(actual);
  server.on('request', provider.callback());
  console.log(`listening http://127.0.0.1:${actual}`);
});
server.on('error', (e) => {
  console.error(`cannot listen on 127.0.0.1:${port}: ${e.message}`);
  process.exit(1);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
