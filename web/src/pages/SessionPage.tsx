import { useEffect, useRef, useState } from 'preact/hooks';
import { api, errorText } from '../api';
import type { Session, SessionEvent } from '../api';
import type { Desktop, DesktopState } from '../desktop';
import { duration, words } from '../format';
import { navigate } from '../router';
import { useSessionEvents } from '../timeline';
import { ErrorBox, Status, useAsync, usePageTitle } from '../ui';

/** States in which the browser VM has (or is about to have) a desktop. */
const DESKTOP_STATES = new Set(['starting_login', 'awaiting_user', 'capturing', 'delivering']);

const FINAL = new Set(['completed', 'cancelled', 'failed']);

const STATUS: Record<string, string> = {
  requested: 'Requested',
  starting_vm: 'Starting your browser VM…',
  starting_login: 'Starting the login…',
  awaiting_user: 'Sign in with the provider in the desktop below',
  capturing: 'Capturing the credential…',
  delivering: 'Delivering the credential to your CLI VM…',
  completed: 'Connected',
  cancelled: 'Cancelled',
  failed: 'Failed',
};

/** `#/sessions/:id`: the live desktop, the timeline, paste and login input. */
export function SessionPage({ id }: { id: string }) {
  usePageTitle('Connect session');
  // SSE carries the steps; polling keeps the state right even without it.
  const [polling, setPolling] = useState(true);
  const s = useAsync<Session>(() => api.session(id), [id], polling ? 2000 : undefined);
  const finished = s.data?.done ?? false;
  useEffect(() => {
    // A final state never changes: stop asking.
    if (finished) setPolling(false);
  }, [finished]);
  const { events } = useSessionEvents(id);
  const session = s.data;
  // The stream is live, the poll lags up to 2 s: the newer of the two wins.
  const last = [...events].reverse().find((e) => e.kind === 'state' && e.to_state);
  let state = session?.state ?? last?.to_state ?? null;
  if (session && !session.done && last?.to_state && last.at > session.state_since) state = last.to_state;
  const done = (session?.done ?? false) || (state !== null && FINAL.has(state));
  const [error, setError] = useState<string | null>(null);

  if (!session && s.error) {
    return (
      <section>
        <h1>Connect session</h1>
        <ErrorBox error={s.error} />
        <p>
          <a href="#/providers">Back to providers</a>
        </p>
      </section>
    );
  }

  const retry = async () => {
    if (!session) return;
    setError(null);
    try {
      const n = await api.createSession(session.provider);
      navigate(`/sessions/${n.id}`);
    } catch (e) {
      setError(errorText(e));
    }
  };
  const cancel = async () => {
    setError(null);
    try {
      await api.cancelSession(id);
      await s.reload();
    } catch (e) {
      setError(errorText(e));
    }
  };

  return (
    <section class="session">
      <h1>Connect {session?.provider ?? 'session'}</h1>
      <div class="session-head">
        <p class={`session-status state-${state ?? 'loading'}`} data-testid="session-status" aria-live="polite">
          {state ? (STATUS[state] ?? words(state)) : 'Loading…'}
        </p>
        {!done && session && (
          <button type="button" data-testid="cancel" onClick={() => void cancel()}>
            Cancel
          </button>
        )}
      </div>
      <ErrorBox error={error} />
      {state === 'failed' && session && (
        <div class="error" role="alert">
          <p>
            <strong>The connection failed: {session.failure?.reason ?? 'unknown reason'}.</strong>
          </p>
          {session.failure?.detail && <p>{session.failure.detail}</p>}
          <button type="button" class="primary" data-testid="retry" onClick={() => void retry()}>
            Retry
          </button>
        </div>
      )}
      {state === 'cancelled' && session && (
        <p>
          This session was cancelled.{' '}
          <button type="button" data-testid="retry" onClick={() => void retry()}>
            Start a new one
          </button>
        </p>
      )}
      {state === 'completed' && (
        <p class="success">
          {session?.provider} is connected: the credential is on your CLI VM. <a href="#/workspace">Open the CLI workspace</a>
        </p>
      )}
      <div class="session-grid">
        <div class="desktop-col">
          <DesktopPanel id={id} state={state} done={done} />
        </div>
        <aside class="side-col">
          {!done && <LoginInput id={id} enabled={state === 'awaiting_user'} />}
          <Timeline events={events} createdAt={session?.created_at ?? null} />
        </aside>
      </div>
    </section>
  );
}

function DesktopPanel({ id, state, done }: { id: string; state: string | null; done: boolean }) {
  const box = useRef<HTMLDivElement>(null);
  const desk = useRef<Desktop | null>(null);
  const doneRef = useRef(done);
  doneRef.current = done;
  const [dstate, setDstate] = useState<DesktopState>(done ? 'disconnected' : 'connecting');
  const [derr, setDerr] = useState<string | null>(null);
  const [paste, setPaste] = useState('');
  const [pasted, setPasted] = useState('');
  const wanted = !done && state !== null && DESKTOP_STATES.has(state);

  useEffect(() => {
    if (!wanted || !box.current || desk.current) return;
    const el = box.current;
    let cancelled = false;
    setDstate('connecting');
    // noVNC is loaded only on this page: the first page load stays small.
    import('../desktop')
      .then(({ Desktop }) => {
        if (cancelled || desk.current || doneRef.current) return;
        const d = new Desktop(el, id, {
          onState: setDstate,
          onError: setDerr,
          alive: () => !doneRef.current,
        });
        desk.current = d;
        d.start();
      })
      .catch((e: unknown) => setDerr(`The desktop viewer did not load: ${errorText(e)}; reload the page`));
    return () => {
      cancelled = true;
    };
  }, [wanted, id]);
  useEffect(() => {
    if (!done) return;
    desk.current?.stop();
    desk.current = null;
    setDstate('disconnected');
  }, [done]);
  useEffect(
    () => () => {
      desk.current?.stop();
      desk.current = null;
    },
    [id],
  );

  return (
    <div class="desktop-panel">
      <div class="desktop-bar">
        <h2>Desktop</h2>
        <span>
          Connection:{' '}
          <span class={`pill ds-${dstate}`} data-testid="desktop-state" aria-live="polite">
            {dstate}
          </span>
        </span>
      </div>
      {!wanted && !done && <Status>Starting your browser VM…</Status>}
      {done && <p class="muted">The desktop closed with the session.</p>}
      <ErrorBox error={derr} />
      {wanted && (
        <p class="hint" id="desktop-help">
          Click the desktop (or focus it and press Enter) to type into it; F6 leaves it.
        </p>
      )}
      <div
        class={`desktop ${wanted ? '' : 'hidden'}`}
        ref={box}
        data-testid="desktop"
        role="application"
        aria-label="Remote desktop"
        aria-describedby={wanted ? 'desktop-help' : undefined}
        tabIndex={0}
        onKeyDownCapture={(e) => {
          // The desktop takes every key (Tab too) once its canvas has focus:
          // F6 is the way out, so the keyboard never gets trapped.
          if (e.key === 'F6' && !e.ctrlKey && !e.altKey && !e.metaKey) {
            e.preventDefault();
            e.stopPropagation();
            document.getElementById('paste-text')?.focus();
          } else if (e.key === 'Enter' && e.target === e.currentTarget) {
            e.preventDefault();
            desk.current?.focus();
          }
        }}
      />
      {!done && (
        <form
          class="paste"
          onSubmit={(e) => {
            e.preventDefault();
            const n = desk.current?.typeText(paste) ?? 0;
            setPasted(n ? `Typed ${n} key${n === 1 ? '' : 's'} into the desktop.` : 'The desktop is not connected: nothing was typed.');
            if (n) desk.current?.focus();
          }}
        >
          <label for="paste-text">Paste text into the desktop (typed as keys, safe with any keyboard layout)</label>
          <textarea id="paste-text" data-testid="paste-text" rows={2} value={paste} onInput={(e) => setPaste(e.currentTarget.value)} />
          <button type="submit" data-testid="paste-send" disabled={dstate !== 'connected' || !paste}>
            Type it
          </button>
          <Status>{pasted}</Status>
        </form>
      )}
    </div>
  );
}

function LoginInput({ id, enabled }: { id: string; enabled: boolean }) {
  const [text, setText] = useState('');
  const [enter, setEnter] = useState(true);
  const [msg, setMsg] = useState('');
  const [error, setError] = useState<string | null>(null);
  return (
    <form
      class="login-input"
      onSubmit={async (e) => {
        e.preventDefault();
        setError(null);
        setMsg('');
        try {
          await api.sessionInput(id, text, enter);
          setText('');
          setMsg('Sent to the login.');
        } catch (err) {
          setError(errorText(err));
        }
      }}
    >
      <h2>Login terminal</h2>
      <p class="hint">Some CLIs ask you to paste a code from the provider's page back into them: send it here.</p>
      <label for="login-input">Text for the CLI's login prompt</label>
      <input id="login-input" data-testid="login-input" autocomplete="off" value={text} onInput={(e) => setText(e.currentTarget.value)} />
      <label class="check">
        <input type="checkbox" checked={enter} onChange={(e) => setEnter(e.currentTarget.checked)} /> Press Enter after it
      </label>
      <button type="submit" data-testid="login-input-send" disabled={!enabled || !text}>
        Send
      </button>
      <Status>{msg}</Status>
      <ErrorBox error={error} />
    </form>
  );
}

function eventText(e: SessionEvent): string {
  if (e.kind === 'state') return `${words(e.from_state ?? '—')} → ${words(e.to_state ?? '—')}`;
  if (e.kind === 'created') return 'session created';
  if (e.kind === 'input') {
    const n = typeof e.detail.chars === 'number' ? e.detail.chars : '?';
    return `you sent ${n} characters to the login`;
  }
  return words(e.kind);
}

function eventExtra(e: SessionEvent): string | null {
  const d = { ...e.detail };
  if (e.kind === 'created') return null;
  if (e.kind === 'input') return null;
  delete d.state;
  const keys = Object.keys(d);
  if (!keys.length) return null;
  return keys.map((k) => `${k}: ${typeof d[k] === 'string' ? d[k] : JSON.stringify(d[k])}`).join('; ');
}

function Timeline({ events, createdAt }: { events: SessionEvent[]; createdAt: number | null }) {
  const t0 = createdAt ?? events[0]?.at ?? 0;
  return (
    <div class="timeline-box">
      <h2>Timeline</h2>
      <ol class="timeline" data-testid="timeline" aria-live="polite">
        {events.map((e) => {
          const extra = eventExtra(e);
          return (
            <li key={e.id} data-kind={e.kind}>
              <span class="t">+{duration(e.at - t0)}</span> <span>{eventText(e)}</span>
              {extra && <div class="extra">{extra}</div>}
            </li>
          );
        })}
      </ol>
      {!events.length && <p class="muted">No steps yet.</p>}
    </div>
  );
}
