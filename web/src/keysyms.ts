// Text as X keysyms: what "Paste text" types into the desktop. Keysyms
// name characters, not keys, so the remote keyboard layout does not
// matter and AltGr is never involved.
import keysyms from 'novnc-keysymdef';

export const XK_RETURN = 0xff0d;
export const XK_TAB = 0xff09;

/** The keysyms that type `text` (CRLF counts as one Enter). */
export function textToKeysyms(text: string): number[] {
  const out: number[] = [];
  const s = text.replace(/\r\n?/g, '\n');
  for (const ch of s) {
    const cp = ch.codePointAt(0);
    if (cp === undefined) continue;
    if (ch === '\n') out.push(XK_RETURN);
    else if (ch === '\t') out.push(XK_TAB);
    else if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0))
      continue; // other control characters type nothing
    else out.push(keysyms.lookup(cp));
  }
  return out;
}
