// What the dashboard's browser tests share: Debian's Chromium driven by
// playwright-core, screenshots as artifacts, axe-core checks, and reading
// the noVNC canvas to find things on the remote screen by colour.
import { chromium } from 'playwright-core';
import AxeBuilder from '@axe-core/playwright';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

/** A setting the Rust test passes in the environment. */
export function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (the Rust e2e test sets it)`);
  return v;
}

export const BASE = () => env('POLYDEV_URL');
export const ARTIFACTS = () => {
  const d = env('POLYDEV_ARTIFACTS');
  mkdirSync(d, { recursive: true });
  return d;
};

/** Debian's Chromium, headless, as the project's guide says. */
export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

export function step(msg) {
  console.log(`[${new Date().toISOString()}] ${msg}`);
}

export async function shot(page, name) {
  const path = join(ARTIFACTS(), name);
  await page.screenshot({ path, fullPage: false });
  step(`screenshot ${path}`);
}

/** axe-core on the page as it is: no serious or critical violation. */
export async function axe(page, what) {
  const r = await new AxeBuilder({ page }).withTags(['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']).analyze();
  const bad = r.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  if (bad.length) {
    const text = bad
      .map((v) => `${v.id} (${v.impact}): ${v.help}\n    ${v.nodes.map((n) => n.target.join(' ')).slice(0, 5).join('\n    ')}`)
      .join('\n');
    throw new Error(`axe: ${bad.length} serious violation(s) on ${what}:\n${text}`);
  }
  step(`axe: ${what}: 0 serious (${r.violations.length} minor, ${r.passes.length} rules passed)`);
}

/** The colours of the test sign-in pages (tests/oidc/signin-colours.json). */
export function colours() {
  const raw = JSON.parse(readFileSync(env('POLYDEV_SIGNIN_COLOURS'), 'utf8'));
  const out = {};
  for (const [k, hex] of Object.entries(raw)) {
    out[k] = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  }
  return out;
}

/**
 * The bounding box (framebuffer pixels) of the pixels within `tol` of
 * `rgb` on the desktop canvas, if at least `min` of them; plus how many
 * dark pixels are inside it and the canvas' size and place on the page.
 */
export async function findColour(page, rgb, tol, min) {
  return page.evaluate(
    ([rgb, tol, min]) => {
      const c = document.querySelector('[data-testid="desktop"] canvas');
      if (!c || !c.width || !c.height) return null;
      const ctx = c.getContext('2d');
      if (!ctx) return null;
      const { data } = ctx.getImageData(0, 0, c.width, c.height);
      let x0 = Infinity, y0 = Infinity, x1 = -1, y1 = -1, n = 0;
      for (let y = 0; y < c.height; y++) {
        for (let x = 0; x < c.width; x++) {
          const i = (y * c.width + x) * 4;
          if (
            Math.abs(data[i] - rgb[0]) <= tol &&
            Math.abs(data[i + 1] - rgb[1]) <= tol &&
            Math.abs(data[i + 2] - rgb[2]) <= tol
          ) {
            n++;
            if (x < x0) x0 = x;
            if (y < y0) y0 = y;
            if (x > x1) x1 = x;
            if (y > y1) y1 = y;
          }
        }
      }
      if (n < min) return null;
      let dark = 0;
      for (let y = y0; y <= y1; y++) {
        for (let x = x0; x <= x1; x++) {
          const i = (y * c.width + x) * 4;
          if (data[i] < 90 && data[i + 1] < 90 && data[i + 2] < 90) dark++;
        }
      }
      const r = c.getBoundingClientRect();
      return {
        x: x0, y: y0, w: x1 - x0 + 1, h: y1 - y0 + 1, n, dark,
        fbw: c.width, fbh: c.height,
        left: r.left, top: r.top, cw: r.width, ch: r.height,
      };
    },
    [rgb, tol, min],
  );
}

/** Page coordinates of a framebuffer box's centre. */
export function centre(b) {
  return {
    x: b.left + ((b.x + b.w / 2) * b.cw) / b.fbw,
    y: b.top + ((b.y + b.h / 2) * b.ch) / b.fbh,
  };
}

/** Poll `fn` every `ms` until it returns something truthy, or fail at the deadline. */
export async function until(what, seconds, fn, ms = 500) {
  const end = Date.now() + seconds * 1000;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`${what}: not within ${seconds} s`);
    await new Promise((r) => setTimeout(r, ms));
  }
}

/** JSON from the API with the page's own cookie (what the page itself could do). */
export async function apiInPage(page, method, path, body) {
  return page.evaluate(
    async ([method, path, body]) => {
      const r = await fetch(path, {
        method,
        credentials: 'same-origin',
        headers: body === undefined ? {} : { 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await r.text();
      let json = null;
      try {
        json = JSON.parse(text);
      } catch {
        json = text;
      }
      return { status: r.status, json };
    },
    [method, path, body],
  );
}
