import { defineConfig } from 'vite';
import { fileURLToPath } from 'node:url';

// noVNC's package exports only core/rfb.js; the keysym table (for the
// layout-safe "paste text") lives beside it, so it gets an alias.
const keysymdef = fileURLToPath(new URL('./node_modules/@novnc/novnc/core/input/keysymdef.js', import.meta.url));

export default defineConfig({
  base: '/',
  resolve: { alias: { 'novnc-keysymdef': keysymdef } },
  oxc: { jsx: { runtime: 'automatic', importSource: 'preact' } },
  build: {
    // noVNC uses top-level await (its H.264 capability probe).
    target: 'es2022',
    outDir: 'dist',
    assetsDir: 'assets',
    // The controller serves everything from memory: no source maps to ship.
    sourcemap: false,
    // Inlined assets would become data: URLs; keep them as files.
    assetsInlineLimit: 0,
    chunkSizeWarningLimit: 700,
  },
  // A dev server in front of a local controller: `POLYDEV_API=http://127.0.0.1:8080 npm run dev`.
  server: {
    proxy: process.env.POLYDEV_API
      ? {
          '/api': { target: process.env.POLYDEV_API, ws: true },
          '/metrics': { target: process.env.POLYDEV_API },
        }
      : undefined,
  },
});
