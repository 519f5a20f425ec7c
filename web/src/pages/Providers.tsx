import { useState } from 'preact/hooks';
import { api, ApiError, errorText } from '../api';
import type { Credential, Provider, Session } from '../api';
import { ago, when, words } from '../format';
import { navigate } from '../router';
import { ConfirmButton, ErrorBox, Status, useAsync, usePageTitle } from '../ui';

interface Overview {
  providers: Provider[];
  credentials: Credential[];
  sessions: Session[];
}

type CardState =
  | { kind: 'not_connected' }
  | { kind: 'connecting'; session: Session }
  | { kind: 'connected'; cred: Credential; session?: Session }
  | { kind: 'failed'; session: Session };

/** The newest session of each provider (the list comes oldest first). */
function latestByProvider(sessions: Session[]): Map<string, Session> {
  const m = new Map<string, Session>();
  for (const s of sessions) {
    const prev = m.get(s.provider);
    if (!prev || s.created_at >= prev.created_at) m.set(s.provider, s);
  }
  return m;
}

function cardState(p: Provider, o: Overview, latest: Map<string, Session>): CardState {
  const s = latest.get(p.id);
  const cred = o.credentials.find((c) => c.provider === p.id);
  if (s && !s.done) return { kind: 'connecting', session: s };
  if (cred) return { kind: 'connected', cred, session: s };
  if (s && s.state === 'failed') return { kind: 'failed', session: s };
  return { kind: 'not_connected' };
}

const LABEL: Record<CardState['kind'], string> = {
  not_connected: 'Not connected',
  connecting: 'Connecting…',
  connected: 'Connected',
  failed: 'Failed',
};

/** `#/providers` (home): one card per provider, Connect / Reconnect / Disconnect. */
export function Providers() {
  usePageTitle('Providers');
  const o = useAsync<Overview>(
    async () => {
      const [providers, credentials, sessions] = await Promise.all([api.providers(), api.credentials(), api.sessions()]);
      return { providers, credentials, sessions };
    },
    [],
    5000,
  );
  const [error, setError] = useState<string | null>(null);
  const [conflict, setConflict] = useState<Session | null>(null);
  const [notice, setNotice] = useState('');

  const connect = async (provider: string) => {
    setError(null);
    setConflict(null);
    try {
      const s = await api.createSession(provider);
      navigate(`/sessions/${s.id}`);
    } catch (e) {
      setError(errorText(e));
      if (e instanceof ApiError && e.status === 409) {
        // The per-user limit: point at the session that is still running.
        const live = (o.data?.sessions ?? []).filter((s) => !s.done);
        const fresh = live.length ? live : (await api.sessions().catch(() => [])).filter((s) => !s.done);
        setConflict(fresh[fresh.length - 1] ?? null);
      }
    }
  };

  const disconnect = async (p: Provider) => {
    setError(null);
    try {
      await api.deleteCredential(p.id);
      setNotice(`${p.name} disconnected.`);
      await o.reload();
    } catch (e) {
      setError(errorText(e));
    }
  };

  const latest = latestByProvider(o.data?.sessions ?? []);
  return (
    <section>
      <h1>Providers</h1>
      <p class="hint">Connect a provider to sign its CLI in through a browser in a VM; the credential then goes to your CLI VM.</p>
      <ErrorBox error={error}>
        {conflict && (
          <p>
            A connect session is still running:{' '}
            <a href={`#/sessions/${conflict.id}`} data-testid="live-session-link">
              open {conflict.provider} session {conflict.id}
            </a>{' '}
            (finish or cancel it first).
          </p>
        )}
      </ErrorBox>
      <ErrorBox error={o.error} />
      <Status>{notice}</Status>
      {o.loading && !o.data && <Status>Loading providers…</Status>}
      <ul class="cards">
        {(o.data?.providers ?? []).map((p) => {
          const st = cardState(p, o.data!, latest);
          return (
            <li class={`card state-${st.kind}`} key={p.id} data-testid={`provider-card-${p.id}`}>
              <h2>{p.name}</h2>
              <p class="muted">
                <code>{p.npm_package}</code>
              </p>
              <p class="badge" data-testid={`provider-state-${p.id}`}>
                {LABEL[st.kind]}
              </p>
              <CardDetail st={st} />
              <div class="actions">
                {st.kind !== 'connecting' && (
                  <button type="button" class="primary" data-testid={`connect-${p.id}`} onClick={() => void connect(p.id)}>
                    {st.kind === 'connected' ? 'Reconnect' : st.kind === 'failed' ? 'Try again' : 'Connect'}
                  </button>
                )}
                {st.kind === 'connected' && (
                  <ConfirmButton
                    label="Disconnect"
                    question={`Delete the ${p.name} credential and remove it from your CLI VM?`}
                    confirmLabel="Yes, disconnect"
                    testid={`disconnect-${p.id}`}
                    onConfirm={() => disconnect(p)}
                  />
                )}
              </div>
            </li>
          );
        })}
      </ul>
    </section>
  );
}

function CardDetail({ st }: { st: CardState }) {
  switch (st.kind) {
    case 'connecting':
      return (
        <p>
          {words(st.session.state)} since {ago(st.session.state_since)} — <a href={`#/sessions/${st.session.id}`}>open the session</a>
        </p>
      );
    case 'connected':
      return (
        <dl class="facts">
          <dt>CLI VM</dt>
          <dd>{st.cred.holder_vm_id ? <a href="#/workspace">{st.cred.holder_vm_id}</a> : 'none yet'}</dd>
          <dt>Status</dt>
          <dd>
            {st.cred.status === 'needs_login' ? (
              <span class="failure">
                <strong>needs login</strong>
                {st.cred.status_reason ? `: ${st.cred.status_reason}` : ''}
              </span>
            ) : (
              'working'
            )}
          </dd>
          <dt>Version</dt>
          <dd>{st.cred.version}</dd>
          <dt>Since</dt>
          <dd>{when(st.cred.created_at)}</dd>
          <dt>Last refreshed</dt>
          <dd>{when(st.cred.last_refresh_at ?? st.cred.updated_at)}</dd>
          <dt>Expires</dt>
          <dd>{st.cred.expires_at ? when(st.cred.expires_at) : 'not readable'}</dd>
        </dl>
      );
    case 'failed':
      return (
        <p class="failure">
          <strong>{st.session.failure?.reason ?? 'failed'}</strong>
          {st.session.failure?.detail ? `: ${st.session.failure.detail}` : ''} <a href={`#/sessions/${st.session.id}`}>details</a>
        </p>
      );
    default:
      return <p class="muted">No credential stored.</p>;
  }
}
