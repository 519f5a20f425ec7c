// A typed wrapper over the public JSON API under /api/v1 (same origin,
// session cookie). Errors come back as RFC 7807 problems: `ApiError`
// carries their `detail` for the person. A 401 anywhere means the cookie
// is gone or expired: the registered handler sends the page to sign-in.

/** The RFC 7807 body of every error answer. */
export interface Problem {
  type?: string;
  title: string;
  status: number;
  detail: string;
  request_id?: string | null;
}

/** A failed request: `message` is the problem's `detail` (what to do). */
export class ApiError extends Error {
  readonly status: number;
  readonly title: string;
  constructor(status: number, title: string, detail: string) {
    super(detail);
    this.status = status;
    this.title = title;
  }
}

export type Role = 'user' | 'admin';
export const SCOPES = [
  'sessions:read',
  'sessions:write',
  'vms:read',
  'vms:write',
  'credentials:read',
  'credentials:write',
  'streams:connect',
  'admin',
  'metrics:read',
] as const;
export type Scope = (typeof SCOPES)[number];

export interface Me {
  id: string;
  name: string;
  role: Role;
  scopes: Scope[];
  via: string;
}
export interface Failure {
  reason: string;
  detail: string;
}
export interface Provider {
  id: string;
  name: string;
  npm_package: string;
}
export interface Credential {
  provider: string;
  version: number;
  created_at: number;
  updated_at: number;
  /** The CLI VM holding the files (added by the credential-holder work; may be absent). */
  holder_vm_id?: string | null;
  /** When its tokens were last obtained (sign-in or a refresh written back), ms. */
  last_refresh_at?: number | null;
  /** When its access token expires, ms, when the provider's files say. */
  expires_at?: number | null;
  /** `ok`, or `needs_login` when it is known dead. */
  status?: string;
  /** Why it needs a login. */
  status_reason?: string | null;
}
export interface Session {
  id: string;
  provider: string;
  state: string;
  done: boolean;
  state_since: number;
  created_at: number;
  deadline_at?: number | null;
  browser_vm_id?: string | null;
  failure?: Failure | null;
}
export interface SessionEvent {
  id: number;
  at: number;
  kind: string;
  detail: Record<string, unknown>;
  from_state?: string | null;
  to_state?: string | null;
}
export interface Vm {
  id: string;
  kind: 'cli' | 'browser';
  state: string;
  done: boolean;
  state_since: number;
  created_at: number;
  failure?: Failure | null;
}
export interface Run {
  id: string;
  provider: string;
  vm_id: string;
  prompt: string;
  cwd: string;
  state: string;
  done: boolean;
  reason?: string | null;
  exit_code?: number | null;
  cancel_requested: boolean;
  timeout_secs: number;
  created_at: number;
  started_at?: number | null;
  finished_at?: number | null;
}
export interface RunEvent {
  seq: number;
  at: number;
  /** `output` (a line the CLI printed) or `state`. */
  source: string;
  /** The line's JSON `type`, `raw` for a line that is not JSON, or the new state. */
  type: string;
  data: unknown;
  raw: string;
}
export interface AdminVm extends Vm {
  owner_id?: string | null;
  owner_name?: string | null;
  memory_mib?: number | null;
  vcpus?: number | null;
}
export interface Ticket {
  ticket: string;
  expires_at: number;
  kind: 'desktop' | 'terminal';
  resource_id: string;
}
export interface Token {
  id: string;
  name: string;
  scopes: Scope[];
  created_at: number;
  expires_at?: number | null;
  last_used_at?: number | null;
  revoked_at?: number | null;
}
export interface TokenCreated extends Token {
  token: string;
}
export interface User {
  id: string;
  name: string;
  role: string;
  created_at: number;
}
export interface LoginLink {
  user_name: string;
  token: string;
  path: string;
  expires_at: number;
}
export interface UpstreamStats {
  provider: string;
  size: number;
  assigned: number;
  quarantined: number;
  free: number;
  exhausted_total: number;
}
export interface Assignment {
  user_id: string;
  provider: string;
  port: number;
  pinned: boolean;
  assigned_at: number;
}
export interface Upstreams {
  providers: UpstreamStats[];
  assignments: Assignment[];
}
export interface SessionSummary {
  by_state: Record<string, number>;
  failures_by_reason: Record<string, number>;
}

let onUnauthorized: () => void = () => {};

/** What to do on any 401 (the app sends the page to sign-in). */
export function setUnauthorizedHandler(f: () => void): void {
  onUnauthorized = f;
}

type Method = 'GET' | 'POST' | 'PUT' | 'DELETE';

async function problemOf(res: Response): Promise<ApiError> {
  let title = res.statusText || 'Request failed';
  let detail = `the server answered ${res.status} ${res.statusText}`.trim();
  try {
    const body = (await res.json()) as Partial<Problem>;
    if (typeof body.title === 'string') title = body.title;
    if (typeof body.detail === 'string' && body.detail) detail = body.detail;
  } catch {
    // Not a problem document (a proxy's page, an empty body): keep the status line.
  }
  return new ApiError(res.status, title, detail);
}

/**
 * One request. State-changing methods always carry a JSON body (`{}` when
 * there is nothing to send): the server requires it as its CSRF defence.
 */
export async function request<T>(
  method: Method,
  path: string,
  body?: unknown,
  opts: { accept?: string; silent401?: boolean } = {},
): Promise<T> {
  const headers: Record<string, string> = { Accept: opts.accept ?? 'application/json' };
  const init: RequestInit = { method, headers, credentials: 'same-origin' };
  if (method !== 'GET') {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body ?? {});
  }
  let res: Response;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'Network error', `the server cannot be reached (${String(e)}): check the connection and retry`);
  }
  if (res.status === 401 && !opts.silent401) onUnauthorized();
  if (!res.ok) throw await problemOf(res);
  if (res.status === 204) return undefined as T;
  if (opts.accept === 'text/plain') return (await res.text()) as T;
  return (await res.json()) as T;
}

const enc = encodeURIComponent;
const get = <T>(p: string) => request<T>('GET', p);
const text = (p: string) => request<string>('GET', p, undefined, { accept: 'text/plain' });

/** The endpoints the dashboard uses, one function each. */
export const api = {
  me: () => request<Me>('GET', '/api/v1/me', undefined, { silent401: true }),
  login: (name: string, password: string) => request<Me>('POST', '/api/v1/auth/login', { name, password }, { silent401: true }),
  redeemLink: (token: string) => request<Me>('POST', '/api/v1/auth/link', { token }, { silent401: true }),
  logout: () => request<void>('POST', '/api/v1/auth/logout', {}, { silent401: true }),
  setPassword: (new_password: string, current_password: string | null) =>
    request<void>('PUT', '/api/v1/me/password', { new_password, current_password }, { silent401: true }),

  providers: () => get<Provider[]>('/api/v1/providers'),
  credentials: () => get<Credential[]>('/api/v1/credentials'),
  deleteCredential: (provider: string) => request<void>('DELETE', `/api/v1/credentials/${enc(provider)}`, {}),

  sessions: () => get<Session[]>('/api/v1/sessions'),
  session: (id: string) => get<Session>(`/api/v1/sessions/${enc(id)}`),
  createSession: (provider: string) => request<Session>('POST', '/api/v1/sessions', { provider }),
  cancelSession: (id: string) => request<Session>('POST', `/api/v1/sessions/${enc(id)}/cancel`, {}),
  sessionInput: (id: string, text: string, enter: boolean) => request<void>('POST', `/api/v1/sessions/${enc(id)}/input`, { text, enter }),
  sessionEvents: (id: string) => get<SessionEvent[]>(`/api/v1/sessions/${enc(id)}/events`),

  ticket: (kind: 'desktop' | 'terminal', resource_id: string) => request<Ticket>('POST', '/api/v1/tickets', { kind, resource_id }),

  runs: () => get<Run[]>('/api/v1/runs?limit=20'),
  createRun: (provider: string, prompt: string) => request<Run>('POST', '/api/v1/runs', { provider, prompt }),
  cancelRun: (id: string) => request<Run>('DELETE', `/api/v1/runs/${enc(id)}`),
  runEvents: (id: string) => get<RunEvent[]>(`/api/v1/runs/${enc(id)}/events`),
  vms: () => get<Vm[]>('/api/v1/vms'),
  vm: (id: string) => get<Vm>(`/api/v1/vms/${enc(id)}`),
  createCliVm: () => request<Vm>('POST', '/api/v1/vms', { kind: 'cli' }),
  startVm: (id: string) => request<Vm>('POST', `/api/v1/vms/${enc(id)}/start`, {}),
  stopVm: (id: string) => request<Vm>('POST', `/api/v1/vms/${enc(id)}/stop`, {}),

  tokens: () => get<Token[]>('/api/v1/tokens'),
  createToken: (name: string, scopes: Scope[], expires_at: number | null) =>
    request<TokenCreated>('POST', '/api/v1/tokens', { name, scopes, expires_at }),
  revokeToken: (id: string) => request<void>('DELETE', `/api/v1/tokens/${enc(id)}`, {}),

  users: () => get<User[]>('/api/v1/admin/users'),
  createUser: (name: string, password: string | null, role: Role) => request<User>('POST', '/api/v1/admin/users', { name, password, role }),
  loginLink: (id: string) => request<LoginLink>('POST', `/api/v1/admin/users/${enc(id)}/login-link`, {}),
  adminVms: () => get<AdminVm[]>('/api/v1/admin/vms'),
  adminVmLog: (id: string, which: 'console' | 'agent' | 'egress') => text(`/api/v1/admin/vms/${enc(id)}/logs/${which}`),
  sessionSummary: () => get<SessionSummary>('/api/v1/admin/sessions/summary'),
  upstreams: () => get<Upstreams>('/api/v1/admin/upstreams'),
  metrics: () => text('/metrics'),
};

/** The problem's detail for the person, whatever was thrown. */
export function errorText(e: unknown): string {
  if (e instanceof ApiError) return e.message;
  if (e instanceof Error) return e.message;
  return String(e);
}

/** A ws:// or wss:// URL on this origin. */
export function wsUrl(path: string): string {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${location.host}${path}`;
}
