// Who is signed in, shared by the pages.
import { createContext } from 'preact';
import { useContext } from 'preact/hooks';
import type { Me } from './api';

export interface Auth {
  me: Me | null;
  /** After a login: remember who it is. */
  setMe(me: Me | null): void;
}

export const AuthContext = createContext<Auth>({ me: null, setMe: () => {} });

export function useAuth(): Auth {
  return useContext(AuthContext);
}
