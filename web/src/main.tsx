// The Polydev Remote dashboard: a single page on the public /api/v1 (same
// origin, session cookie), hash-routed so the server serves only `/` and
// /assets/*. No inline script anywhere: the page runs under a strict CSP.
//
// Stable data-testid hooks for the browser tests:
//   sign-in:     signin-name, signin-password, signin-submit
//   passwords:   new-password, new-password-repeat, set-password-submit (current-password when asked)
//   nav:         nav-providers, nav-workspace, nav-tokens, nav-account, nav-admin, signout
//   providers:   provider-card-<id>, provider-state-<id>, connect-<id>, disconnect-<id>
//                (then disconnect-<id>-confirm), live-session-link (on a 409)
//   session:     desktop (noVNC's container; data-connected-at while connected), desktop-state,
//                session-status, timeline, paste-text, paste-send, login-input, login-input-send,
//                retry, cancel
//   workspace:   vm-state, vm-start, vm-stop, vm-create, terminal, terminal-state, terminal-new
//   tokens:      token-name, token-scope-<scope>, token-expiry, token-create, token-value,
//                token-list, token-revoke-<id> (then token-revoke-<id>-confirm)
//   admin:       admin-users, admin-vms, admin-sessions, admin-upstreams, admin-metrics,
//                admin-denied, user-name, user-create, login-link-<name>, login-link
// Measurement hook: window.__polydev.desktopFirstFrameAt (performance.now() of the first
// desktop frame drawn).
import { render } from 'preact';
import { useEffect, useMemo, useState } from 'preact/hooks';
import { api, setUnauthorizedHandler } from './api';
import type { Me } from './api';
import { match, navigate, toSignIn, useRoute } from './router';
import { AuthContext } from './session';
import { Account } from './pages/Account';
import { Admin } from './pages/Admin';
import { Link } from './pages/Link';
import { Providers } from './pages/Providers';
import { SessionPage } from './pages/SessionPage';
import { SignIn } from './pages/SignIn';
import { Tokens } from './pages/Tokens';
import { Workspace } from './pages/Workspace';
import { Status } from './ui';
import './styles.css';

/** Routes anyone may open without a login. */
const PUBLIC = ['/signin', '/link/:token'];

function App() {
  const path = useRoute();
  const [me, setMe] = useState<Me | null>(null);
  const [checked, setChecked] = useState(false);
  const isPublic = PUBLIC.some((p) => match(p, path));

  useEffect(() => {
    setUnauthorizedHandler(() => {
      setMe(null);
      if (!PUBLIC.some((p) => match(p, location.hash.replace(/^#/, '')))) toSignIn();
    });
    // The link page logs in by itself; elsewhere, ask who this is.
    if (match('/link/:token', path)) {
      setChecked(true);
      return;
    }
    api
      .me()
      .then(setMe)
      .catch(() => setMe(null))
      .finally(() => setChecked(true));
  }, []);

  useEffect(() => {
    if (!checked) return;
    if (!me && !isPublic) toSignIn();
    else if (me && (path === '/' || path === '/signin')) navigate('/providers');
  }, [checked, me, path]);

  const auth = useMemo(() => ({ me, setMe }), [me]);
  return (
    <AuthContext.Provider value={auth}>
      <a
        class="skip"
        href="#main"
        onClick={(e) => {
          // A plain #main would be taken as a route.
          e.preventDefault();
          document.getElementById('main')?.focus();
        }}
      >
        Skip to content
      </a>
      <header class="top">
        <span class="brand">Polydev Remote</span>
        {me && <NavBar me={me} path={path} onSignedOut={() => setMe(null)} />}
      </header>
      <main id="main" tabIndex={-1}>
        {!checked ? <Status>Loading…</Status> : <Page path={path} me={me} />}
      </main>
    </AuthContext.Provider>
  );
}

function NavBar({ me, path, onSignedOut }: { me: Me; path: string; onSignedOut: () => void }) {
  const item = (href: string, label: string, testid: string) => (
    <li>
      <a href={`#${href}`} data-testid={testid} aria-current={path.startsWith(href) ? 'page' : undefined}>
        {label}
      </a>
    </li>
  );
  return (
    <nav aria-label="Main">
      <ul>
        {item('/providers', 'Providers', 'nav-providers')}
        {item('/workspace', 'CLI workspace', 'nav-workspace')}
        {item('/tokens', 'API tokens', 'nav-tokens')}
        {me.role === 'admin' && item('/admin', 'Admin', 'nav-admin')}
        {item('/account', me.name, 'nav-account')}
        <li>
          <button
            type="button"
            class="link"
            data-testid="signout"
            onClick={async () => {
              try {
                await api.logout();
              } finally {
                onSignedOut();
                navigate('/signin');
              }
            }}
          >
            Sign out
          </button>
        </li>
      </ul>
    </nav>
  );
}

function Page({ path, me }: { path: string; me: Me | null }) {
  let p: Record<string, string> | null;
  if ((p = match('/link/:token', path))) return <Link token={p.token} />;
  if (path === '/signin' || !me) return <SignIn />;
  if (path === '/providers' || path === '/') return <Providers />;
  if ((p = match('/sessions/:id', path))) return <SessionPage id={p.id} key={p.id} />;
  if (path === '/workspace') return <Workspace />;
  if (path === '/tokens') return <Tokens />;
  if (path === '/account') return <Account />;
  if (path === '/admin') return <Admin tab="users" />;
  if ((p = match('/admin/:tab', path))) return <Admin tab={p.tab} />;
  return (
    <section>
      <h1>Not found</h1>
      <p>
        There is no page at <code>#{path}</code>. <a href="#/providers">Go to Providers</a>.
      </p>
    </section>
  );
}

const root = document.getElementById('app');
if (root) render(<App />, root);
