// Event streams from Server-Sent Events: a session's timeline, a run's
// output. EventSource resumes by itself after a drop (it sends
// `Last-Event-ID`, the server continues after that event); the server ends
// the stream with an `end` event once its subject is final.
import { useEffect, useState } from 'preact/hooks';
import { api } from './api';
import type { RunEvent, SessionEvent } from './api';

/** The events of the stream at `path` (named `kinds`), oldest first by
 * `key`, as they happen; `done` once the server ended it. When the server
 * refuses the stream, `list` reads them once and the stream is tried again
 * a little later. */
function useEventStream<T>(
  path: string,
  kinds: string[],
  key: (e: T) => number,
  list: () => Promise<T[]>,
): { events: T[]; live: boolean; done: boolean } {
  const [events, setEvents] = useState<T[]>([]);
  const [live, setLive] = useState(false);
  const [done, setDone] = useState(false);
  useEffect(() => {
    setEvents([]);
    setDone(false);
    let closed = false;
    let retry: number | undefined;
    let es: EventSource | null = null;
    const add = (e: T) => setEvents((xs) => (xs.some((x) => key(x) === key(e)) ? xs : [...xs, e].sort((a, b) => key(a) - key(b))));
    const onEvent = (ev: MessageEvent<string>) => {
      try {
        add(JSON.parse(ev.data) as T);
      } catch {
        // A malformed event: skip it, the stream goes on.
      }
    };
    const open = () => {
      es = new EventSource(path);
      es.onopen = () => setLive(true);
      for (const k of kinds) es.addEventListener(k, onEvent as EventListener);
      es.addEventListener('end', () => {
        closed = true;
        es?.close();
        setLive(false);
        setDone(true);
      });
      es.onerror = () => {
        setLive(false);
        // CONNECTING: EventSource retries by itself. CLOSED: the server
        // refused (e.g. a 401/404, or an old proxy).
        if (es?.readyState === EventSource.CLOSED && !closed) {
          list()
            .then((xs) => xs.forEach(add))
            .catch(() => {});
          retry = window.setTimeout(open, 5000);
        }
      };
    };
    open();
    return () => {
      closed = true;
      window.clearTimeout(retry);
      es?.close();
    };
  }, [path]);
  return { events, live, done };
}

/** The session's events, oldest first, as they happen. */
export function useSessionEvents(sessionId: string): { events: SessionEvent[]; live: boolean } {
  const { events, live } = useEventStream<SessionEvent>(
    `/api/v1/sessions/${encodeURIComponent(sessionId)}/events`,
    // Event kinds a session's stream names (`event:` lines); others arrive as `message`.
    ['created', 'state', 'input', 'message'],
    (e) => e.id,
    () => api.sessionEvents(sessionId),
  );
  return { events, live };
}

/** A run's events (output lines and state changes), oldest first, as they
 * happen; `done` once the run is final. */
export function useRunEvents(runId: string): { events: RunEvent[]; done: boolean } {
  const { events, done } = useEventStream<RunEvent>(
    `/api/v1/runs/${encodeURIComponent(runId)}/events`,
    ['output', 'state'],
    (e) => e.seq,
    () => api.runEvents(runId),
  );
  return { events, done };
}
