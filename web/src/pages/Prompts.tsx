// Prompt runs from the page: pick a connected CLI, type a prompt, and
// watch its output stream in (Server-Sent Events, `useRunEvents`); the
// recent runs stay listed with their outcome.
import { useEffect, useState } from 'preact/hooks';
import { api, errorText } from '../api';
import type { Credential, Run, RunEvent } from '../api';
import { useRunEvents } from '../timeline';
import { ago, words } from '../format';
import { ErrorBox, Status, useAsync } from '../ui';

/** What a person reads of one output line: the text a CLI's typed event
 * carries, else the line as printed. */
function lineText(e: RunEvent): string {
  const d = e.data as Record<string, unknown> | null;
  if (d && typeof d === 'object') {
    for (const k of ['text', 'result', 'message', 'content']) {
      const v = d[k];
      if (typeof v === 'string' && v.trim()) return v;
    }
  }
  return e.raw;
}

/** One run's output and outcome, with Cancel while it goes on. */
function RunOutput({ run, onChanged }: { run: Run; onChanged: () => void }) {
  const { events, done } = useRunEvents(run.id);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    if (done) onChanged();
  }, [done]);
  const last = [...events].reverse().find((e) => e.source === 'state');
  const state = last?.type ?? run.state;
  const lines = events.filter((e) => e.source === 'output').map((e) => `[${e.type}] ${lineText(e)}`);
  return (
    <div class="run" data-testid="run">
      <p>
        <span class={`pill run-${state}`} data-testid="run-state" aria-live="polite">
          {words(state)}
        </span>{' '}
        <code>{run.provider}</code>: {run.prompt}
        {!done && !run.done && (
          <button
            type="button"
            data-testid="run-cancel"
            onClick={() =>
              void api
                .cancelRun(run.id)
                .then(onChanged)
                .catch((e) => setError(errorText(e)))
            }
          >
            Cancel
          </button>
        )}
      </p>
      <ErrorBox error={error} />
      <pre class="run-output" data-testid="run-output" tabIndex={0} aria-label="The run's output">
        {lines.join('\n') || (done ? '(no output)' : 'Waiting for output…')}
      </pre>
    </div>
  );
}

/** The CLI VM's prompt runs: a form, the selected run's stream, history. */
export function Prompts() {
  const creds = useAsync<Credential[]>(() => api.credentials(), []);
  const runs = useAsync<Run[]>(() => api.runs(), [], 5000);
  const [provider, setProvider] = useState('');
  const [prompt, setPrompt] = useState('');
  const [selected, setSelected] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const connected = creds.data ?? [];
  const chosen = provider || connected[0]?.provider || '';
  const shown = runs.data?.find((r) => r.id === selected) ?? null;

  const submit = async (ev: Event) => {
    ev.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const run = await api.createRun(chosen, prompt);
      setSelected(run.id);
      setPrompt('');
      await runs.reload();
    } catch (e) {
      setError(errorText(e));
    } finally {
      setBusy(false);
    }
  };

  return (
    <section class="prompts" aria-labelledby="prompts-h">
      <h2 id="prompts-h">Prompts</h2>
      <ErrorBox error={creds.error ?? runs.error ?? error} />
      {creds.data && !connected.length ? (
        <Status>Connect a provider first (Providers): its CLI runs your prompts here.</Status>
      ) : (
        <form onSubmit={(e) => void submit(e)}>
          <label for="run-provider">CLI</label>
          <select id="run-provider" data-testid="run-provider" value={chosen} onChange={(e) => setProvider(e.currentTarget.value)}>
            {connected.map((c) => (
              <option key={c.provider} value={c.provider}>
                {c.provider}
              </option>
            ))}
          </select>
          <label for="run-prompt">Prompt</label>
          <textarea id="run-prompt" data-testid="run-prompt" rows={3} value={prompt} onInput={(e) => setPrompt(e.currentTarget.value)} />
          <button type="submit" class="primary" data-testid="run-submit" disabled={busy || !prompt.trim() || !chosen}>
            Run
          </button>
        </form>
      )}
      {shown && <RunOutput key={shown.id} run={shown} onChanged={() => void runs.reload()} />}
      {runs.data && runs.data.length > 0 && (
        <ul class="runs" data-testid="runs">
          {runs.data.map((r) => (
            <li key={r.id}>
              <button type="button" class="link" aria-pressed={r.id === selected} onClick={() => setSelected(r.id)}>
                <span class={`pill run-${r.state}`}>{words(r.state)}</span> <code>{r.provider}</code> {r.prompt.slice(0, 80)}
              </button>{' '}
              <span class="muted">
                {ago(r.created_at)}
                {r.exit_code != null ? `, exit ${r.exit_code}` : ''}
                {r.reason ? `: ${r.reason}` : ''}
              </span>
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}
