import { useEffect, useState } from 'preact/hooks';
import { api, errorText } from '../api';
import { navigate } from '../router';
import { useAuth } from '../session';
import { ErrorBox, Status, usePageTitle } from '../ui';
import { PasswordForm } from './PasswordForm';

/** `#/link/:token`: the one-time login link (first start, lost password), then a new password. */
export function Link({ token }: { token: string }) {
  usePageTitle('Set a new password');
  const { setMe } = useAuth();
  const [state, setState] = useState<'redeeming' | 'ready' | 'failed'>('redeeming');
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let live = true;
    api
      .redeemLink(token)
      .then((me) => {
        if (!live) return;
        setMe(me);
        setState('ready');
        // The token must not stay in the address bar or the history.
        history.replaceState(null, '', '#/link/used');
      })
      .catch((e) => {
        if (!live) return;
        setError(errorText(e));
        setState('failed');
      });
    return () => {
      live = false;
    };
  }, [token]);
  return (
    <section class="narrow">
      <h1>Set a new password</h1>
      {state === 'redeeming' && <Status>Checking the login link…</Status>}
      {state === 'failed' && (
        <ErrorBox error={`This login link does not work: ${error ?? ''}`}>
          <p>
            Links work once and expire. Ask an administrator for a new one, or <a href="#/signin">sign in</a>.
          </p>
        </ErrorBox>
      )}
      {state === 'ready' && (
        <>
          <p>You are signed in with the link. Choose the password you will sign in with from now on.</p>
          <PasswordForm askCurrent={false} submitLabel="Set password" onDone={() => navigate('/providers')} />
        </>
      )}
    </section>
  );
}
