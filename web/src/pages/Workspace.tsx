import { useEffect, useRef, useState } from 'preact/hooks';
import { api, errorText } from '../api';
import type { Vm } from '../api';
import { ago, words } from '../format';
import type { TerminalState, TerminalView } from '../terminal';
import { ErrorBox, Status, useAsync, usePageTitle } from '../ui';
import { Prompts } from './Prompts';

/** The user's CLI VM: the newest one of kind `cli` that is not done. */
function cliVm(vms: Vm[]): Vm | null {
  const live = vms.filter((v) => v.kind === 'cli' && !v.done);
  live.sort((a, b) => a.created_at - b.created_at);
  return live[live.length - 1] ?? null;
}

/** `#/workspace`: the CLI VM's state, Start / Stop, and its terminal. */
export function Workspace() {
  usePageTitle('CLI workspace');
  const vms = useAsync<Vm[]>(() => api.vms(), [], 3000);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const vm = vms.data ? cliVm(vms.data) : null;

  const act = async (f: () => Promise<unknown>) => {
    setBusy(true);
    setError(null);
    try {
      await f();
      await vms.reload();
    } catch (e) {
      setError(errorText(e));
    } finally {
      setBusy(false);
    }
  };

  return (
    <section class="workspace">
      <h1>CLI workspace</h1>
      <ErrorBox error={error} />
      <ErrorBox error={vms.error} />
      {vms.loading && !vms.data && <Status>Loading your VMs…</Status>}
      {vms.data && !vm && (
        <div>
          <p>You have no CLI VM yet. It is where your connected CLIs run.</p>
          <button type="button" class="primary" data-testid="vm-create" disabled={busy} onClick={() => void act(() => api.createCliVm())}>
            Create CLI VM
          </button>
        </div>
      )}
      {vm && (
        <>
          <div class="vm-bar">
            <span>
              VM <code>{vm.id}</code>:{' '}
              <span class={`pill vm-${vm.state}`} data-testid="vm-state" aria-live="polite">
                {words(vm.state)}
              </span>{' '}
              <span class="muted">since {ago(vm.state_since)}</span>
            </span>
            <span class="actions">
              <button
                type="button"
                data-testid="vm-start"
                disabled={busy || vm.state !== 'hibernated'}
                onClick={() => void act(() => api.startVm(vm.id))}
              >
                Start
              </button>
              <button
                type="button"
                data-testid="vm-stop"
                disabled={busy || vm.state !== 'running'}
                onClick={() => void act(() => api.stopVm(vm.id))}
              >
                Stop
              </button>
            </span>
          </div>
          {vm.failure && (
            <div class="error" role="alert">
              <p>
                <strong>{vm.failure.reason}</strong>: {vm.failure.detail}
              </p>
            </div>
          )}
          {vm.state !== 'running' && AWAKES.includes(vm.state) && (
            <Status>The VM is {words(vm.state)}: its terminal resumes it, which takes a moment.</Status>
          )}
          {vm.state === 'running' || AWAKES.includes(vm.state) ? (
            <>
              <Terminals vmId={vm.id} />
              <Prompts />
            </>
          ) : (
            <Status>{`The VM is ${words(vm.state)}…`}</Status>
          )}
        </>
      )}
    </section>
  );
}

/** States of a CLI VM that a terminal resumes (it hibernated when idle). */
const AWAKES = ['hibernating', 'hibernated', 'resuming'];

const MAX_TERMINALS = 16;

/** The names of the kept terminals this browser has opened in `vmId`. */
function savedNames(vmId: string): string[] {
  try {
    const v: unknown = JSON.parse(localStorage.getItem(`polydev.terminals.${vmId}`) ?? '[]');
    const names = Array.isArray(v) ? v.filter((n): n is string => typeof n === 'string' && /^[a-z0-9][a-z0-9-]{0,31}$/.test(n)) : [];
    return names.length ? names.slice(0, MAX_TERMINALS) : ['main'];
  } catch {
    return ['main'];
  }
}

/** Tabs of kept terminals: each a shell that outlives the page. */
function Terminals({ vmId }: { vmId: string }) {
  const [names, setNames] = useState<string[]>(() => savedNames(vmId));
  const [active, setActive] = useState(names[0] ?? 'main');
  const save = (next: string[]) => {
    setNames(next);
    localStorage.setItem(`polydev.terminals.${vmId}`, JSON.stringify(next));
  };
  const add = () => {
    let n = 2;
    while (names.includes(`t${n}`)) n++;
    save([...names, `t${n}`]);
    setActive(`t${n}`);
  };
  const closed = (name: string) => {
    const next = names.filter((n) => n !== name);
    save(next.length ? next : ['main']);
    setActive(next[0] ?? 'main');
  };
  return (
    <div>
      <div class="tabs">
        <div class="tabs" role="tablist" aria-label="Terminals">
          {names.map((n) => (
            <button type="button" role="tab" aria-selected={n === active} data-testid={`terminal-tab-${n}`} onClick={() => setActive(n)}>
              {n}
            </button>
          ))}
        </div>
        {names.length < MAX_TERMINALS && (
          <button type="button" data-testid="terminal-add" onClick={add}>
            + Terminal
          </button>
        )}
      </div>
      <TerminalPanel key={active} vmId={vmId} session={active} onClosed={() => closed(active)} />
    </div>
  );
}

function TerminalPanel({ vmId, session, onClosed }: { vmId: string; session: string; onClosed: () => void }) {
  const box = useRef<HTMLDivElement>(null);
  const view = useRef<TerminalView | null>(null);
  const [state, setState] = useState<TerminalState>('connecting');
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    if (!box.current) return;
    const el = box.current;
    let cancelled = false;
    // xterm.js is loaded only on this page: the first page load stays small.
    import('../terminal')
      .then(({ TerminalView }) => {
        if (cancelled) return;
        // Mounted only while the VM runs: a drop while mounted is worth a reconnect.
        const v = new TerminalView(el, vmId, session, { onState: setState, onError: setError, alive: () => true });
        view.current = v;
        v.connect();
        v.focus();
      })
      .catch((e: unknown) => setError(`The terminal did not load: ${errorText(e)}; reload the page`));
    return () => {
      cancelled = true;
      view.current?.dispose();
      view.current = null;
    };
  }, [vmId, session]);
  return (
    <div class="terminal-panel">
      <div class="terminal-bar">
        <h2>Terminal {session}</h2>
        <span>
          Connection:{' '}
          <span class={`pill ts-${state}`} data-testid="terminal-state" aria-live="polite">
            {state}
          </span>
        </span>
        {state === 'ended' && (
          <button type="button" data-testid="terminal-new" onClick={() => view.current?.newShell()}>
            New shell
          </button>
        )}
        {state === 'connected' && (
          <button type="button" data-testid="terminal-close" onClick={() => view.current?.close()}>
            Close terminal
          </button>
        )}
        {state === 'ended' && session !== 'main' && (
          <button type="button" data-testid="terminal-remove" onClick={onClosed}>
            Remove tab
          </button>
        )}
      </div>
      <ErrorBox error={error} />
      <div class="terminal" ref={box} data-testid="terminal" />
    </div>
  );
}
