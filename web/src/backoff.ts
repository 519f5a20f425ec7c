// Reconnect delays: 1 s, 2 s, 4 s, … at most 15 s.

export const BACKOFF_MAX_MS = 15_000;

/** The delay before reconnect attempt `n` (0-based). */
export function backoffDelay(n: number): number {
  return Math.min(1000 * 2 ** Math.min(n, 10), BACKOFF_MAX_MS);
}
