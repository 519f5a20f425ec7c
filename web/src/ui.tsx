// Small building blocks shared by the pages.
import type { ComponentChildren } from 'preact';
import { useCallback, useEffect, useRef, useState } from 'preact/hooks';
import { ApiError, errorText } from './api';

/** An error for the person (`role="alert"`: announced at once). */
export function ErrorBox({ error, children }: { error: string | null; children?: ComponentChildren }) {
  if (!error) return null;
  return (
    <div class="error" role="alert">
      <p>{error}</p>
      {children}
    </div>
  );
}

/** A polite live region: status changes are announced without interrupting. */
export function Status({ children, testid }: { children: ComponentChildren; testid?: string }) {
  return (
    <p class="status" aria-live="polite" data-testid={testid}>
      {children}
    </p>
  );
}

export interface Async<T> {
  data: T | undefined;
  error: string | null;
  /** The HTTP status of the last failure (404: the endpoint is not there). */
  status: number | null;
  loading: boolean;
  reload: () => Promise<void>;
}

/** Loads `load()` on mount (and on `reload`), and every `pollMs` if given. */
export function useAsync<T>(load: () => Promise<T>, deps: unknown[] = [], pollMs?: number): Async<T> {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState<string | null>(null);
  const [status, setStatus] = useState<number | null>(null);
  const [loading, setLoading] = useState(true);
  const live = useRef(true);
  const run = useCallback(async () => {
    try {
      const d = await load();
      if (!live.current) return;
      setData(d);
      setError(null);
      setStatus(null);
    } catch (e) {
      if (!live.current) return;
      setError(errorText(e));
      setStatus(e instanceof ApiError ? e.status : null);
    } finally {
      if (live.current) setLoading(false);
    }
  }, deps);
  useEffect(() => {
    live.current = true;
    setLoading(true);
    void run();
    let t: number | undefined;
    if (pollMs) t = window.setInterval(() => void run(), pollMs);
    return () => {
      live.current = false;
      window.clearInterval(t);
    };
  }, [run, pollMs]);
  return { data, error, status, loading, reload: run };
}

/**
 * A destructive action with an inline confirmation: the first click asks,
 * `<testid>-confirm` does it (no window.confirm, which tests and screen
 * readers handle poorly).
 */
export function ConfirmButton(props: {
  label: string;
  question: string;
  confirmLabel: string;
  onConfirm: () => void | Promise<void>;
  testid?: string;
  disabled?: boolean;
}) {
  const [asking, setAsking] = useState(false);
  const yes = useRef<HTMLButtonElement>(null);
  useEffect(() => {
    if (asking) yes.current?.focus();
  }, [asking]);
  if (!asking) {
    return (
      <button type="button" class="danger" data-testid={props.testid} disabled={props.disabled} onClick={() => setAsking(true)}>
        {props.label}
      </button>
    );
  }
  return (
    <span class="confirm" role="group" aria-label={props.question}>
      <span>{props.question}</span>{' '}
      <button
        type="button"
        class="danger"
        ref={yes}
        data-testid={props.testid ? `${props.testid}-confirm` : undefined}
        onClick={async () => {
          setAsking(false);
          await props.onConfirm();
        }}
      >
        {props.confirmLabel}
      </button>{' '}
      <button type="button" onClick={() => setAsking(false)}>
        Cancel
      </button>
    </span>
  );
}

/** Sets the document title with the page's heading. */
export function usePageTitle(title: string): void {
  useEffect(() => {
    document.title = `${title} · Polydev Remote`;
  }, [title]);
}

/** A read-only field with a Copy button. */
export function CopyField({ label, value, testid, id }: { label: string; value: string; testid?: string; id: string }) {
  const [copied, setCopied] = useState(false);
  const ref = useRef<HTMLInputElement>(null);
  return (
    <div class="copy-field">
      <label for={id}>{label}</label>
      <div class="row">
        <input id={id} ref={ref} type="text" readOnly value={value} data-testid={testid} onFocus={(e) => e.currentTarget.select()} />
        <button
          type="button"
          onClick={async () => {
            ref.current?.select();
            try {
              await navigator.clipboard.writeText(value);
              setCopied(true);
            } catch {
              setCopied(false);
            }
          }}
        >
          Copy
        </button>
      </div>
      <span aria-live="polite" class="hint">
        {copied ? 'Copied.' : ''}
      </span>
    </div>
  );
}
