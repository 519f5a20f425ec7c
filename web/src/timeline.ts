// A session's timeline from Server-Sent Events. EventSource resumes by
// itself after a drop (it sends `Last-Event-ID`, the server continues
// after that event); the server ends the stream with an `end` event once
// the session is final.
import { useEffect, useState } from 'preact/hooks';
import { api } from './api';
import type { SessionEvent } from './api';

/** Event kinds a session's stream names (`event:` lines); others arrive as `message`. */
const KINDS = ['created', 'state', 'input', 'message'];

/** The session's events, oldest first, as they happen. */
export function useSessionEvents(sessionId: string): { events: SessionEvent[]; live: boolean } {
  const [events, setEvents] = useState<SessionEvent[]>([]);
  const [live, setLive] = useState(false);
  useEffect(() => {
    setEvents([]);
    let closed = false;
    let retry: number | undefined;
    let es: EventSource | null = null;
    const add = (e: SessionEvent) => setEvents((xs) => (xs.some((x) => x.id === e.id) ? xs : [...xs, e].sort((a, b) => a.id - b.id)));
    const onEvent = (ev: MessageEvent<string>) => {
      try {
        add(JSON.parse(ev.data) as SessionEvent);
      } catch {
        // A malformed event: skip it, the stream goes on.
      }
    };
    const open = () => {
      es = new EventSource(`/api/v1/sessions/${encodeURIComponent(sessionId)}/events`);
      es.onopen = () => setLive(true);
      for (const k of KINDS) es.addEventListener(k, onEvent as EventListener);
      es.addEventListener('end', () => {
        closed = true;
        es?.close();
        setLive(false);
      });
      es.onerror = () => {
        setLive(false);
        // CONNECTING: EventSource retries by itself. CLOSED: the server
        // refused (e.g. a 401/404, or an old proxy): read the list once
        // and try the stream again a little later.
        if (es?.readyState === EventSource.CLOSED && !closed) {
          api
            .sessionEvents(sessionId)
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
  }, [sessionId]);
  return { events, live };
}
