import { useState } from 'preact/hooks';
import { useAuth } from '../session';
import { Status, usePageTitle } from '../ui';
import { PasswordForm } from './PasswordForm';

/** `#/account`: change the password. */
export function Account() {
  usePageTitle('Account');
  const { me } = useAuth();
  const [done, setDone] = useState(false);
  return (
    <section class="narrow">
      <h1>Account</h1>
      <p>
        Signed in as <strong>{me?.name}</strong> ({me?.role}).
      </p>
      <h2>Change password</h2>
      <p class="hint">Changing it signs out every other browser; API tokens keep working.</p>
      <PasswordForm askCurrent={true} submitLabel="Change password" onDone={() => setDone(true)} />
      <Status>{done ? 'Password changed.' : ''}</Status>
    </section>
  );
}
