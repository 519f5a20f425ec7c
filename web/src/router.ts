// Hash routing: the server only ever serves index.html at `/` (plus
// /assets/*), so every page lives after the `#`.
import { useEffect, useState } from 'preact/hooks';

/** The current route, e.g. `/providers` for `#/providers`. */
export function currentPath(): string {
  const h = location.hash.replace(/^#/, '');
  return h.startsWith('/') ? h : '/';
}

/** Go to a route (`/sessions/ses-1`). */
export function navigate(path: string): void {
  const target = `#${path}`;
  if (location.hash !== target) location.hash = target;
}

/** Re-renders on every hash change; answers the route. */
export function useRoute(): string {
  const [path, setPath] = useState(currentPath());
  useEffect(() => {
    const on = () => setPath(currentPath());
    addEventListener('hashchange', on);
    return () => removeEventListener('hashchange', on);
  }, []);
  return path;
}

/** Matches `pattern` (`/sessions/:id`) against `path`; answers the params or null. */
export function match(pattern: string, path: string): Record<string, string> | null {
  const ps = pattern.split('/');
  const xs = path.split('?')[0].split('/');
  if (ps.length !== xs.length) return null;
  const out: Record<string, string> = {};
  for (let i = 0; i < ps.length; i++) {
    if (ps[i].startsWith(':')) {
      if (!xs[i]) return null;
      try {
        out[ps[i].slice(1)] = decodeURIComponent(xs[i]);
      } catch {
        return null;
      }
    } else if (ps[i] !== xs[i]) return null;
  }
  return out;
}

const RETURN_KEY = 'polydev.returnTo';

/** Sends the page to sign-in, remembering where it was (to come back after). */
export function toSignIn(): void {
  const here = currentPath();
  if (here !== '/' && here !== '/signin' && !here.startsWith('/link/')) sessionStorage.setItem(RETURN_KEY, here);
  navigate('/signin');
}

/** After a login: the page sign-in interrupted, else Providers. */
export function afterSignIn(): void {
  const to = sessionStorage.getItem(RETURN_KEY);
  sessionStorage.removeItem(RETURN_KEY);
  navigate(to && to.startsWith('/') ? to : '/providers');
}
