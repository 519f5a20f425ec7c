// A CLI VM's kept terminal in xterm.js over the ticketed WebSocket: bytes
// both ways as binary messages, resize and close as text control messages,
// the shell's exit as a text event. The shell lives on in the VM when the
// WebSocket drops: a reconnect (with backoff and a fresh single-use ticket)
// attaches to it again, and the server replays its recent output, so the
// screen is cleared first.
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import '@xterm/xterm/css/xterm.css';
import { api, errorText, wsUrl } from './api';
import { backoffDelay } from './backoff';

export type TerminalState = 'connecting' | 'connected' | 'reconnecting' | 'ended';

export interface TerminalHandlers {
  onState(state: TerminalState): void;
  onError(message: string | null): void;
  /** Whether the VM still runs (a drop then means reconnect). */
  alive(): boolean;
}

interface ExitEvent {
  type: 'exit';
  code?: number | null;
  signal?: number | null;
}

/** One terminal view; `dispose()` ends it. */
export class TerminalView {
  private readonly term: Terminal;
  private readonly fit = new FitAddon();
  private readonly resizeObserver: ResizeObserver;
  private readonly encoder = new TextEncoder();
  private ws: WebSocket | null = null;
  private timer: number | undefined;
  private attempt = 0;
  private disposed = false;
  private ended = false;
  private everConnected = false;

  constructor(
    container: HTMLElement,
    private readonly vmId: string,
    /** The kept terminal's name in the VM. */
    private readonly session: string,
    private readonly h: TerminalHandlers,
  ) {
    this.term = new Terminal({
      cursorBlink: true,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
      fontSize: 14,
      scrollback: 5000,
      theme: { background: '#111418', foreground: '#e6e6e6' },
    });
    this.term.loadAddon(this.fit);
    this.term.open(container);
    this.safeFit();
    this.term.onData((d) => this.send(this.encoder.encode(d)));
    this.term.onBinary((d) => {
      const b = new Uint8Array(d.length);
      for (let i = 0; i < d.length; i++) b[i] = d.charCodeAt(i) & 0xff;
      this.send(b);
    });
    this.term.onResize(({ cols, rows }) => {
      if (this.ws?.readyState === WebSocket.OPEN) {
        this.ws.send(JSON.stringify({ type: 'resize', cols, rows }));
      }
    });
    // Follow the panel: the fit addon recomputes cols/rows, onResize tells the server.
    this.resizeObserver = new ResizeObserver(() => this.safeFit());
    this.resizeObserver.observe(container);
  }

  /** Connects (the first time, or a new shell after the last one ended). */
  connect(): void {
    this.ended = false;
    this.h.onState(this.everConnected ? 'reconnecting' : 'connecting');
    void this.open();
  }

  /** A new shell after `ended`: clears the screen and connects again. */
  newShell(): void {
    this.term.reset();
    this.attempt = 0;
    this.connect();
  }

  focus(): void {
    this.term.focus();
  }

  /** Ends the shell in the VM (not only this view); its exit follows. */
  close(): void {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: 'close' }));
  }

  dispose(): void {
    this.disposed = true;
    window.clearTimeout(this.timer);
    this.resizeObserver.disconnect();
    const ws = this.ws;
    this.ws = null;
    ws?.close(1000, 'page closed');
    this.term.dispose();
  }

  private safeFit(): void {
    try {
      this.fit.fit();
    } catch {
      // Not laid out yet (hidden panel): the next resize fits.
    }
  }

  private send(b: Uint8Array<ArrayBuffer>): void {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(b);
  }

  private later(): void {
    if (this.disposed || this.ended) return;
    if (!this.h.alive()) {
      this.end();
      return;
    }
    this.h.onState('reconnecting');
    const delay = backoffDelay(this.attempt++);
    window.clearTimeout(this.timer);
    this.timer = window.setTimeout(() => void this.open(), delay);
  }

  private end(): void {
    this.ended = true;
    this.h.onState('ended');
  }

  private async open(): Promise<void> {
    if (this.disposed) return;
    let ticket: string;
    try {
      ticket = (await api.ticket('terminal', this.vmId)).ticket;
    } catch (e) {
      this.h.onError(`The terminal cannot be opened: ${errorText(e)}`);
      this.later();
      return;
    }
    if (this.disposed) return;
    this.safeFit();
    const { cols, rows } = this.term;
    const q = `ticket=${encodeURIComponent(ticket)}&cols=${cols}&rows=${rows}&session=${encodeURIComponent(this.session)}`;
    const ws = new WebSocket(wsUrl(`/api/v1/vms/${encodeURIComponent(this.vmId)}/terminal?${q}`), ['binary']);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.attempt = 0;
      this.everConnected = true;
      // The server sends the shell's recent output first: start from a
      // clean screen so a reattach shows it once.
      this.term.reset();
      this.h.onError(null);
      this.h.onState('connected');
      // The panel may have changed size while connecting.
      ws.send(JSON.stringify({ type: 'resize', cols: this.term.cols, rows: this.term.rows }));
    };
    ws.onmessage = (ev: MessageEvent<ArrayBuffer | string>) => {
      if (typeof ev.data !== 'string') {
        this.term.write(new Uint8Array(ev.data));
        return;
      }
      let msg: Partial<ExitEvent>;
      try {
        msg = JSON.parse(ev.data) as Partial<ExitEvent>;
      } catch {
        return;
      }
      if (msg.type === 'exit') {
        const how = msg.signal != null ? `signal ${msg.signal}` : `code ${msg.code ?? '?'}`;
        this.term.write(`\r\n\x1b[2m[the shell ended with ${how}]\x1b[0m\r\n`);
        this.end();
      }
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.disposed || this.ended) return;
      if (ev.code === 1011 || ev.code === 1003) {
        // The server ended the terminal on purpose: say why, no reconnect loop.
        this.h.onError(`The terminal ended: ${ev.reason || `close code ${ev.code}`}`);
        this.end();
        return;
      }
      this.later();
    };
  }
}
