// Small formatting helpers shared by the pages.

/** A timestamp (ms since the epoch) as local date and time. */
export function when(ms: number | null | undefined): string {
  if (ms == null) return '—';
  return new Date(ms).toLocaleString();
}

/** A duration in ms as `1h 2m`, `3m 4s` or `5.6s`. */
export function duration(ms: number): string {
  if (ms < 0) ms = 0;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)}s`;
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (h > 0) return `${h}h ${m}m`;
  return `${m}m ${s % 60}s`;
}

/** How long ago (ms since the epoch), e.g. `3m 4s ago`. */
export function ago(ms: number): string {
  return `${duration(Date.now() - ms)} ago`;
}

/** A state name (`awaiting_user`) as words. */
export function words(state: string): string {
  return state.replace(/_/g, ' ');
}
