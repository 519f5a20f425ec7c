// A small reader of the Prometheus text format (0.0.4), enough for the
// admin page's short view: samples with their labels.

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?\s*/g;

/** Every sample of `text` (comments and malformed lines skipped). */
export function parseMetrics(text: string): Sample[] {
  const out: Sample[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    if (m[3]) {
      for (const l of m[3].matchAll(LABEL)) {
        labels[l[1]] = l[2].replace(/\\n/g, '\n').replace(/\\"/g, '"').replace(/\\\\/g, '\\');
      }
    }
    const value = Number(m[4]);
    if (!Number.isNaN(value) || m[4] === 'NaN') out.push({ name: m[1], labels, value });
  }
  return out;
}

/** One row of the short view: a label set and its (summed) value. */
export interface Row {
  series: string;
  value: number;
}

/** What the short view shows, in this order. */
const VIEW: { title: string; test: (s: Sample) => boolean; by: string[] }[] = [
  { title: 'Sessions by state', test: (s) => s.name === 'polydev_sessions', by: ['state'] },
  { title: 'VMs by state', test: (s) => s.name === 'polydev_vms', by: ['kind', 'state'] },
  { title: 'HTTP requests', test: (s) => s.name === 'polydev_http_requests_total', by: ['status'] },
  { title: 'Session failures', test: (s) => s.name === 'polydev_session_failures_total', by: ['reason'] },
  { title: 'VM failures', test: (s) => s.name === 'polydev_vm_failures_total', by: ['reason'] },
  { title: 'Stream connects', test: (s) => s.name === 'polydev_stream_connects_total', by: ['kind', 'outcome'] },
  { title: 'Egress bytes', test: (s) => /egress/.test(s.name) && /bytes/.test(s.name), by: ['direction', 'provider'] },
  { title: 'Upstream ports', test: (s) => s.name === 'polydev_upstream_ports', by: ['provider', 'status'] },
];

/** The short view: per group, the samples summed over the labels not in `by`. */
export function shortView(samples: Sample[]): { title: string; rows: Row[] }[] {
  const groups: { title: string; rows: Row[] }[] = [];
  for (const g of VIEW) {
    const sums = new Map<string, number>();
    for (const s of samples) {
      if (!g.test(s)) continue;
      const key = g.by
        .filter((k) => k in s.labels)
        .map((k) => `${k}=${s.labels[k]}`)
        .join(', ');
      const series = key || s.name;
      sums.set(series, (sums.get(series) ?? 0) + s.value);
    }
    if (sums.size) groups.push({ title: g.title, rows: [...sums].map(([series, value]) => ({ series, value })) });
  }
  return groups;
}
