import { useState } from 'preact/hooks';
import { api, errorText, SCOPES } from '../api';
import type { Scope, TokenCreated } from '../api';
import { when } from '../format';
import { useAuth } from '../session';
import { ConfirmButton, CopyField, ErrorBox, Status, useAsync, usePageTitle } from '../ui';

/** Scopes only an admin's token may carry (the server refuses them for others). */
const ADMIN_ONLY: Scope[] = ['admin', 'metrics:read'];

/** `#/tokens`: create (shown once), list, revoke. */
export function Tokens() {
  usePageTitle('API tokens');
  const { me } = useAuth();
  const tokens = useAsync(() => api.tokens(), []);
  const offered = SCOPES.filter((s) => me?.role === 'admin' || !ADMIN_ONLY.includes(s));
  const [name, setName] = useState('');
  const [scopes, setScopes] = useState<Scope[]>(['sessions:read', 'vms:read']);
  const [expiry, setExpiry] = useState('');
  const [created, setCreated] = useState<TokenCreated | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [notice, setNotice] = useState('');

  return (
    <section>
      <h1>API tokens</h1>
      <form
        class="token-form"
        onSubmit={async (e) => {
          e.preventDefault();
          setError(null);
          setCreated(null);
          const expires = expiry ? new Date(`${expiry}T23:59:59`).getTime() : null;
          if (expires !== null && Number.isNaN(expires)) return setError('The expiry date is not a date.');
          try {
            const t = await api.createToken(name.trim(), scopes, expires);
            setCreated(t);
            setName('');
            await tokens.reload();
          } catch (err) {
            setError(errorText(err));
          }
        }}
      >
        <h2>New token</h2>
        <label for="token-name">Name</label>
        <input
          id="token-name"
          data-testid="token-name"
          required
          maxLength={100}
          value={name}
          onInput={(e) => setName(e.currentTarget.value)}
        />
        <fieldset>
          <legend>Scopes</legend>
          {offered.map((s) => (
            <label class="check" key={s}>
              <input
                type="checkbox"
                data-testid={`token-scope-${s}`}
                checked={scopes.includes(s)}
                onChange={(e) => setScopes(e.currentTarget.checked ? [...scopes, s] : scopes.filter((x) => x !== s))}
              />{' '}
              {s}
            </label>
          ))}
        </fieldset>
        <label for="token-expiry">Expires on (optional; end of that day)</label>
        <input id="token-expiry" data-testid="token-expiry" type="date" value={expiry} onInput={(e) => setExpiry(e.currentTarget.value)} />
        <button type="submit" class="primary" data-testid="token-create" disabled={!scopes.length}>
          Create token
        </button>
      </form>
      <ErrorBox error={error} />
      {created && (
        <div class="once" role="status">
          <p>
            <strong>Copy this token now: it is shown only once.</strong> Anyone who has it can act as you within its scopes.
          </p>
          <CopyField id="token-value" label={`Token “${created.name}”`} value={created.token} testid="token-value" />
        </div>
      )}
      <Status>{notice}</Status>
      <h2>Your tokens</h2>
      <ErrorBox error={tokens.error} />
      <table data-testid="token-list">
        <thead>
          <tr>
            <th scope="col">Name</th>
            <th scope="col">Scopes</th>
            <th scope="col">Created</th>
            <th scope="col">Expires</th>
            <th scope="col">Last used</th>
            <th scope="col">
              <span class="sr-only">Actions</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {(tokens.data ?? []).map((t) => (
            <tr key={t.id}>
              <td>{t.name}</td>
              <td>{t.scopes.join(', ')}</td>
              <td>{when(t.created_at)}</td>
              <td>{t.expires_at ? when(t.expires_at) : 'never'}</td>
              <td>{when(t.last_used_at)}</td>
              <td>
                {t.revoked_at ? (
                  `revoked ${when(t.revoked_at)}`
                ) : (
                  <ConfirmButton
                    label="Revoke"
                    question={`Revoke “${t.name}”?`}
                    confirmLabel="Yes, revoke"
                    testid={`token-revoke-${t.id}`}
                    onConfirm={async () => {
                      try {
                        await api.revokeToken(t.id);
                        setNotice(`Token “${t.name}” revoked.`);
                        await tokens.reload();
                      } catch (err) {
                        setError(errorText(err));
                      }
                    }}
                  />
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {tokens.data && !tokens.data.length && <p class="muted">No tokens yet.</p>}
    </section>
  );
}
