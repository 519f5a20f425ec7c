// The live desktop of a connect session: noVNC's RFB over the ticketed
// WebSocket, reconnecting with backoff and a fresh (single-use) ticket
// whenever the connection drops while the session still runs.
import RFB from '@novnc/novnc';
import type { DisconnectDetail, SecurityFailureDetail } from '@novnc/novnc';
import { api, ApiError, errorText, wsUrl } from './api';
import { backoffDelay } from './backoff';
import { textToKeysyms } from './keysyms';

export type DesktopState = 'connecting' | 'connected' | 'reconnecting' | 'disconnected';

declare global {
  interface Window {
    /** Measurement hooks read by the browser tests. */
    __polydev?: { desktopFirstFrameAt?: number };
  }
}

export interface DesktopHandlers {
  onState(state: DesktopState): void;
  /** A problem to show (null clears it). */
  onError(message: string | null): void;
  /** Whether the session still runs (a drop then means reconnect). */
  alive(): boolean;
}

/** One desktop view; `stop()` ends it for good. */
export class Desktop {
  private rfb: RFB | null = null;
  private timer: number | undefined;
  private attempt = 0;
  private stopped = false;
  private everConnected = false;

  constructor(
    private readonly container: HTMLElement,
    private readonly sessionId: string,
    private readonly h: DesktopHandlers,
  ) {}

  /** Starts connecting (the first time, or again after `stop`). */
  start(): void {
    this.stopped = false;
    this.h.onState(this.everConnected ? 'reconnecting' : 'connecting');
    void this.open();
  }

  /** Ends the view; no reconnect follows. */
  stop(): void {
    this.stopped = true;
    window.clearTimeout(this.timer);
    this.timer = undefined;
    const r = this.rfb;
    this.rfb = null;
    r?.disconnect();
    this.container.removeAttribute('data-connected-at');
    this.h.onState('disconnected');
  }

  /** Whether keys can be sent now. */
  get connected(): boolean {
    return this.rfb !== null && this.container.hasAttribute('data-connected-at');
  }

  /** Types `text` as keysyms (layout-safe). Answers how many keys were sent. */
  typeText(text: string): number {
    const r = this.rfb;
    if (!r || !this.connected) return 0;
    const ks = textToKeysyms(text);
    for (const k of ks) r.sendKey(k, null);
    return ks.length;
  }

  focus(): void {
    this.rfb?.focus();
  }

  private later(): void {
    if (this.stopped) return;
    if (!this.h.alive()) {
      this.h.onState('disconnected');
      return;
    }
    this.h.onState(this.everConnected ? 'reconnecting' : 'connecting');
    const delay = backoffDelay(this.attempt++);
    window.clearTimeout(this.timer);
    this.timer = window.setTimeout(() => void this.open(), delay);
  }

  private async open(): Promise<void> {
    if (this.stopped) return;
    let ticket: string;
    try {
      ticket = (await api.ticket('desktop', this.sessionId)).ticket;
    } catch (e) {
      // 409/404: the browser VM has no desktop yet (or just lost it): wait.
      if (!(e instanceof ApiError && (e.status === 409 || e.status === 404))) {
        this.h.onError(`The desktop cannot be opened: ${errorText(e)}`);
      }
      this.later();
      return;
    }
    if (this.stopped) return;
    const url = wsUrl(`/api/v1/sessions/${encodeURIComponent(this.sessionId)}/desktop?ticket=${encodeURIComponent(ticket)}`);
    let rfb: RFB;
    try {
      rfb = new RFB(this.container, url, { wsProtocols: ['binary'], shared: true });
    } catch (e) {
      this.h.onError(`The desktop cannot be opened: ${errorText(e)}`);
      this.later();
      return;
    }
    this.rfb = rfb;
    rfb.scaleViewport = true;
    rfb.resizeSession = true;
    rfb.clipViewport = false;
    rfb.focusOnClick = true;
    rfb.background = '#1b1f24';
    this.watchFirstFrame(rfb);

    rfb.addEventListener('connect', () => {
      if (this.rfb !== rfb) return;
      this.attempt = 0;
      this.everConnected = true;
      this.container.setAttribute('data-connected-at', String(performance.now()));
      this.h.onError(null);
      this.h.onState('connected');
    });
    rfb.addEventListener('disconnect', (ev) => {
      if (this.rfb !== rfb) return;
      this.rfb = null;
      this.container.removeAttribute('data-connected-at');
      const clean = (ev as CustomEvent<DisconnectDetail>).detail?.clean ?? false;
      if (!clean && this.h.alive()) this.h.onError(null);
      this.later();
    });
    rfb.addEventListener('credentialsrequired', () => {
      // The server needs no VNC password: being asked for one is a fault.
      this.h.onError('The desktop asked for a VNC password, which it should never need: report this to your administrator.');
      rfb.disconnect();
    });
    rfb.addEventListener('securityfailure', (ev) => {
      const d = (ev as CustomEvent<SecurityFailureDetail>).detail;
      this.h.onError(`The desktop refused the connection (${d?.reason ?? `status ${d?.status ?? '?'}`}).`);
    });
  }

  /**
   * Records when the first framebuffer update is drawn (a test hook).
   * noVNC has no event for it; its display's `flip` runs at the end of
   * each update (and on the resize at the handshake, before `connect`,
   * which must not count), so it is wrapped when present, else `connect`
   * counts.
   */
  private watchFirstFrame(rfb: RFB): void {
    const mark = () => {
      window.__polydev = { ...(window.__polydev ?? {}), desktopFirstFrameAt: performance.now() };
    };
    const display = (rfb as unknown as { _display?: { flip?: (...a: unknown[]) => unknown } })._display;
    const flip = display?.flip;
    if (display && typeof flip === 'function') {
      let armed = false;
      let done = false;
      rfb.addEventListener('connect', () => (armed = true), { once: true });
      display.flip = function (this: unknown, ...a: unknown[]) {
        const r = flip.apply(this, a);
        if (armed && !done) {
          done = true;
          mark();
        }
        return r;
      };
    } else {
      rfb.addEventListener('connect', mark, { once: true });
    }
  }
}
