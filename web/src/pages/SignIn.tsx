import { useState } from 'preact/hooks';
import { api, errorText } from '../api';
import { afterSignIn } from '../router';
import { useAuth } from '../session';
import { ErrorBox, usePageTitle } from '../ui';

/** `#/signin`: name and password. */
export function SignIn() {
  usePageTitle('Sign in');
  const { setMe } = useAuth();
  const [name, setName] = useState('');
  const [password, setPassword] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  return (
    <section class="narrow">
      <h1>Sign in</h1>
      <form
        onSubmit={async (e) => {
          e.preventDefault();
          setBusy(true);
          setError(null);
          try {
            setMe(await api.login(name.trim(), password));
            afterSignIn();
          } catch (err) {
            setError(errorText(err));
          } finally {
            setBusy(false);
          }
        }}
      >
        <label for="signin-name">Name</label>
        <input
          id="signin-name"
          data-testid="signin-name"
          autocomplete="username"
          required
          value={name}
          onInput={(e) => setName(e.currentTarget.value)}
        />
        <label for="signin-password">Password</label>
        <input
          id="signin-password"
          data-testid="signin-password"
          type="password"
          autocomplete="current-password"
          required
          value={password}
          onInput={(e) => setPassword(e.currentTarget.value)}
        />
        <button type="submit" class="primary" data-testid="signin-submit" disabled={busy}>
          {busy ? 'Signing in…' : 'Sign in'}
        </button>
      </form>
      <ErrorBox error={error} />
      <p class="hint">Lost your password? Ask an administrator for a login link.</p>
    </section>
  );
}
