import { useState } from 'preact/hooks';
import { api, errorText } from '../api';
import { useAuth } from '../session';
import { ErrorBox } from '../ui';

/** The server's rule (PasswordChange.new_password minLength). */
export const MIN_PASSWORD = 15;

/**
 * New password + repeat (and the current one when `askCurrent`). Setting
 * it ends every login session, so it logs in again with the new password.
 */
export function PasswordForm({ askCurrent, submitLabel, onDone }: { askCurrent: boolean; submitLabel: string; onDone: () => void }) {
  const { me, setMe } = useAuth();
  const [current, setCurrent] = useState('');
  const [pw, setPw] = useState('');
  const [repeat, setRepeat] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [needCurrent, setNeedCurrent] = useState(askCurrent);
  const [busy, setBusy] = useState(false);
  return (
    <form
      onSubmit={async (e) => {
        e.preventDefault();
        setError(null);
        if (pw.length < MIN_PASSWORD) return setError(`The password needs at least ${MIN_PASSWORD} characters.`);
        if (pw !== repeat) return setError('The two passwords differ: type the same password twice.');
        if (!me) return setError('You are not signed in any more: sign in again.');
        setBusy(true);
        try {
          await api.setPassword(pw, needCurrent && current ? current : null);
          setMe(await api.login(me.name, pw));
          onDone();
        } catch (err) {
          const msg = errorText(err);
          if (/current_password/.test(msg)) setNeedCurrent(true);
          setError(msg);
        } finally {
          setBusy(false);
        }
      }}
    >
      {needCurrent && (
        <>
          <label for="current-password">Current password</label>
          <input
            id="current-password"
            data-testid="current-password"
            type="password"
            autocomplete="current-password"
            value={current}
            onInput={(e) => setCurrent(e.currentTarget.value)}
          />
        </>
      )}
      <label for="new-password">New password (at least {MIN_PASSWORD} characters)</label>
      <input
        id="new-password"
        data-testid="new-password"
        type="password"
        autocomplete="new-password"
        required
        minLength={MIN_PASSWORD}
        value={pw}
        onInput={(e) => setPw(e.currentTarget.value)}
      />
      <label for="new-password-repeat">Repeat the new password</label>
      <input
        id="new-password-repeat"
        data-testid="new-password-repeat"
        type="password"
        autocomplete="new-password"
        required
        value={repeat}
        onInput={(e) => setRepeat(e.currentTarget.value)}
      />
      <button type="submit" class="primary" data-testid="set-password-submit" disabled={busy}>
        {busy ? 'Saving…' : submitLabel}
      </button>
      <ErrorBox error={error} />
    </form>
  );
}
