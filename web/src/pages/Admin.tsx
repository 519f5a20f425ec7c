import { useState } from 'preact/hooks';
import { api, errorText } from '../api';
import type { AdminVm, LoginLink, Role } from '../api';
import { ago, duration, when, words } from '../format';
import { parseMetrics, shortView } from '../metrics';
import type { Async } from '../ui';
import { CopyField, ErrorBox, Status, useAsync, usePageTitle } from '../ui';
import { useAuth } from '../session';

const TABS = [
  ['users', 'Users'],
  ['vms', 'VMs'],
  ['sessions', 'Sessions'],
  ['upstreams', 'Upstreams'],
  ['metrics', 'Metrics'],
] as const;
type Tab = (typeof TABS)[number][0];

/** `#/admin/:tab`: only for the admin role (others see why, and nothing loads). */
export function Admin({ tab }: { tab: string }) {
  usePageTitle('Admin');
  const { me } = useAuth();
  if (me?.role !== 'admin') {
    return (
      <section>
        <h1>Admin</h1>
        <div class="error" role="alert" data-testid="admin-denied">
          <p>You need the admin role to see this page.</p>
        </div>
      </section>
    );
  }
  const current: Tab = (TABS.find(([t]) => t === tab)?.[0] ?? 'users') as Tab;
  return (
    <section>
      <h1>Admin</h1>
      <nav aria-label="Admin sections" class="subnav">
        <ul>
          {TABS.map(([t, label]) => (
            <li key={t}>
              <a href={`#/admin/${t}`} aria-current={t === current ? 'page' : undefined}>
                {label}
              </a>
            </li>
          ))}
        </ul>
      </nav>
      {current === 'users' && <Users />}
      {current === 'vms' && <Vms />}
      {current === 'sessions' && <Sessions />}
      {current === 'upstreams' && <Upstreams />}
      {current === 'metrics' && <Metrics />}
    </section>
  );
}

/** Loading, "not available" (404: this server has no such endpoint yet) or the error. */
function Loadstate<T>({ a, what }: { a: Async<T>; what: string }) {
  if (a.status === 404) return <p class="muted">{what}: not available on this server.</p>;
  if (a.error) return <ErrorBox error={a.error} />;
  if (a.loading && a.data === undefined) return <Status>Loading {what.toLowerCase()}…</Status>;
  return null;
}

function Users() {
  const users = useAsync(() => api.users(), []);
  const [name, setName] = useState('');
  const [password, setPassword] = useState('');
  const [role, setRole] = useState<Role>('user');
  const [error, setError] = useState<string | null>(null);
  const [link, setLink] = useState<LoginLink | null>(null);
  const [notice, setNotice] = useState('');
  return (
    <div data-testid="admin-users">
      <h2>Users</h2>
      <Loadstate a={users} what="Users" />
      <ErrorBox error={error} />
      <Status>{notice}</Status>
      {link && (
        <div class="once" role="status">
          <p>
            A one-time login link for <strong>{link.user_name}</strong>, valid until {when(link.expires_at)}. Hand it over privately.
          </p>
          <CopyField id="login-link" label="Login link" value={`${location.origin}/#/link/${link.token}`} testid="login-link" />
        </div>
      )}
      {users.data && (
        <table>
          <thead>
            <tr>
              <th scope="col">Name</th>
              <th scope="col">Role</th>
              <th scope="col">Created</th>
              <th scope="col">
                <span class="sr-only">Actions</span>
              </th>
            </tr>
          </thead>
          <tbody>
            {users.data.map((u) => (
              <tr key={u.id}>
                <td>{u.name}</td>
                <td>{u.role}</td>
                <td>{when(u.created_at)}</td>
                <td>
                  <button
                    type="button"
                    data-testid={`login-link-${u.name}`}
                    onClick={async () => {
                      setError(null);
                      try {
                        setLink(await api.loginLink(u.id));
                      } catch (e) {
                        setError(errorText(e));
                      }
                    }}
                  >
                    Login link<span class="sr-only"> for {u.name}</span>
                  </button>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      <form
        class="inline-form"
        onSubmit={async (e) => {
          e.preventDefault();
          setError(null);
          try {
            const u = await api.createUser(name.trim(), password ? password : null, role);
            setNotice(`User ${u.name} created.${password ? '' : ' Give them a login link to set a password.'}`);
            setName('');
            setPassword('');
            await users.reload();
          } catch (err) {
            setError(errorText(err));
          }
        }}
      >
        <h3>New user</h3>
        <label for="user-name">Name (a-z, 0-9, . _ -)</label>
        <input
          id="user-name"
          data-testid="user-name"
          required
          pattern="[a-z0-9][a-z0-9._\-]*"
          maxLength={64}
          value={name}
          onInput={(e) => setName(e.currentTarget.value)}
        />
        <label for="user-password">Initial password (optional, at least 15 characters)</label>
        <input
          id="user-password"
          type="password"
          autocomplete="new-password"
          minLength={15}
          value={password}
          onInput={(e) => setPassword(e.currentTarget.value)}
        />
        <label for="user-role">Role</label>
        <select id="user-role" value={role} onChange={(e) => setRole(e.currentTarget.value as Role)}>
          <option value="user">user</option>
          <option value="admin">admin</option>
        </select>
        <button type="submit" class="primary" data-testid="user-create">
          Create user
        </button>
      </form>
    </div>
  );
}

function Vms() {
  const vms = useAsync(() => api.adminVms(), [], 5000);
  return (
    <div data-testid="admin-vms">
      <h2>VMs</h2>
      <Loadstate a={vms} what="VMs" />
      {vms.data && (
        <table>
          <thead>
            <tr>
              <th scope="col">VM</th>
              <th scope="col">Kind</th>
              <th scope="col">State</th>
              <th scope="col">Age</th>
              <th scope="col">Memory</th>
              <th scope="col">vCPUs</th>
              <th scope="col">Owner</th>
            </tr>
          </thead>
          <tbody>
            {vms.data.map((v) => (
              <VmRow v={v} key={v.id} />
            ))}
          </tbody>
        </table>
      )}
      {vms.data && !vms.data.length && <p class="muted">No VMs.</p>}
    </div>
  );
}

function VmRow({ v }: { v: AdminVm }) {
  return (
    <>
      <tr>
        <td>
          <code>{v.id}</code>
        </td>
        <td>{v.kind}</td>
        <td>
          {words(v.state)} <span class="muted">({ago(v.state_since)})</span>
        </td>
        <td>{duration(Date.now() - v.created_at)}</td>
        <td>{v.memory_mib != null ? `${v.memory_mib} MiB` : '—'}</td>
        <td>{v.vcpus ?? '—'}</td>
        <td>{v.owner_name ?? v.owner_id ?? '—'}</td>
      </tr>
      {v.failure && (
        <tr class="failure-row">
          <td colSpan={7}>
            <strong>{v.failure.reason}</strong>: {v.failure.detail}
            <VmLogs id={v.id} />
          </td>
        </tr>
      )}
    </>
  );
}

function VmLogs({ id }: { id: string }) {
  const [logs, setLogs] = useState<Record<string, string> | null>(null);
  return (
    <details
      onToggle={(e) => {
        if (!(e.currentTarget as HTMLDetailsElement).open || logs) return;
        void Promise.all(
          (['console', 'agent', 'egress'] as const).map(async (w) => {
            try {
              return [w, await api.adminVmLog(id, w)] as const;
            } catch (err) {
              return [w, `(${errorText(err)})`] as const;
            }
          }),
        ).then((xs) => setLogs(Object.fromEntries(xs)));
      }}
    >
      <summary>Logs</summary>
      {!logs && <Status>Loading logs…</Status>}
      {logs &&
        Object.entries(logs).map(([w, text]) => (
          <div key={w}>
            <h3>{w}</h3>
            <pre class="log" tabIndex={0} aria-label={`${w} log of ${id}`}>
              {text || '(empty)'}
            </pre>
          </div>
        ))}
    </details>
  );
}

function CountTable({ caption, head, rows }: { caption: string; head: string; rows: [string, number][] }) {
  return (
    <table>
      <caption>{caption}</caption>
      <thead>
        <tr>
          <th scope="col">{head}</th>
          <th scope="col">Count</th>
        </tr>
      </thead>
      <tbody>
        {rows.map(([k, n]) => (
          <tr key={k}>
            <td>{words(k)}</td>
            <td class="num">{n}</td>
          </tr>
        ))}
        {!rows.length && (
          <tr>
            <td colSpan={2} class="muted">
              none
            </td>
          </tr>
        )}
      </tbody>
    </table>
  );
}

function Sessions() {
  const sum = useAsync(() => api.sessionSummary(), [], 5000);
  return (
    <div data-testid="admin-sessions">
      <h2>Sessions</h2>
      <Loadstate a={sum} what="Session summary" />
      {sum.data && (
        <div class="two">
          <CountTable caption="Sessions by state" head="State" rows={Object.entries(sum.data.by_state)} />
          <CountTable caption="Failures by reason" head="Reason" rows={Object.entries(sum.data.failures_by_reason)} />
        </div>
      )}
    </div>
  );
}

function Upstreams() {
  const up = useAsync(() => api.upstreams(), []);
  return (
    <div data-testid="admin-upstreams">
      <h2>Upstream ports</h2>
      <Loadstate a={up} what="Upstreams" />
      {up.data && (
        <>
          <table>
            <caption>Occupancy per provider</caption>
            <thead>
              <tr>
                <th scope="col">Provider</th>
                <th scope="col">Size</th>
                <th scope="col">Assigned</th>
                <th scope="col">Quarantined</th>
                <th scope="col">Free</th>
                <th scope="col">Exhausted (ever)</th>
              </tr>
            </thead>
            <tbody>
              {up.data.providers.map((p) => (
                <tr key={p.provider}>
                  <td>{p.provider}</td>
                  <td class="num">{p.size}</td>
                  <td class="num">{p.assigned}</td>
                  <td class="num">{p.quarantined}</td>
                  <td class="num">{p.free}</td>
                  <td class="num">{p.exhausted_total}</td>
                </tr>
              ))}
            </tbody>
          </table>
          <table>
            <caption>Assignments</caption>
            <thead>
              <tr>
                <th scope="col">User</th>
                <th scope="col">Provider</th>
                <th scope="col">Port</th>
                <th scope="col">Pinned</th>
                <th scope="col">Assigned</th>
              </tr>
            </thead>
            <tbody>
              {up.data.assignments.map((a) => (
                <tr key={`${a.user_id}/${a.provider}`}>
                  <td>
                    <code>{a.user_id}</code>
                  </td>
                  <td>{a.provider}</td>
                  <td class="num">{a.port}</td>
                  <td>{a.pinned ? 'yes' : 'no'}</td>
                  <td>{when(a.assigned_at)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
    </div>
  );
}

function Metrics() {
  const m = useAsync(() => api.metrics(), [], 10000);
  const groups = m.data ? shortView(parseMetrics(m.data)) : [];
  return (
    <div data-testid="admin-metrics">
      <h2>Metrics</h2>
      <Loadstate a={m} what="Metrics" />
      <div class="two">
        {groups.map((g) => (
          <table key={g.title}>
            <caption>{g.title}</caption>
            <thead>
              <tr>
                <th scope="col">Series</th>
                <th scope="col">Value</th>
              </tr>
            </thead>
            <tbody>
              {g.rows.map((r) => (
                <tr key={r.series}>
                  <td>{r.series}</td>
                  <td class="num">{r.value}</td>
                </tr>
              ))}
            </tbody>
          </table>
        ))}
      </div>
      {m.data !== undefined && (
        <details>
          <summary>Raw metrics</summary>
          <pre class="log" tabIndex={0} aria-label="Raw metrics">
            {m.data}
          </pre>
        </details>
      )}
    </div>
  );
}
