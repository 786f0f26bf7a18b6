// niki.js: a Niki client for browsers. No build step, no dependencies:
//   <script src="niki.js"></script>
//   const niki = new NikiClient("ws://127.0.0.1:8002/v1/ws", {
//     onMessage: (body, id) => console.log(body),   // after it returns, the message is ACKed
//   });
//   niki.connect();
//
// It speaks Niki's line protocol over WebSocket (one line per text frame; the server's
// GET /v1/ws), as telnet does over TCP:
// - the credential the server hands out (SET_CLIENT_ID) is kept in localStorage under
//   `storageKey` and presented again on every connection, so messages queued while the
//   page was closed arrive when it opens again;
// - ACK mode by default: each message is acknowledged once onMessage has returned, so a
//   message the page did not take is sent again on the next connection; a message the
//   server sends again (its ACK was lost with a connection) is recognised by its id,
//   acknowledged and not handed over twice;
// - it reconnects after a lost connection with exponential back-off and full jitter
//   (1 s doubling to `maxBackoff`, 30 s; back to 1 s only after a connection that lasted
//   10 s), and PINGs a silent server every `keepalive` seconds (60), reconnecting when
//   no PONG comes back within as long again;
// - one credential, one connection: tabs of one site share the credential, and two
//   connections of one client take each other over, so only the tab that holds a Web
//   Lock named after `storageKey` connects; the others wait ("waiting") and take over
//   when it closes. (Web Locks need a secure context: https, or http on localhost.)
(function (root) {
  "use strict";

  const MESSAGE_ACK = /^MESSAGE (\d+): (.*)$/s;
  const MESSAGE = /^MESSAGE: (.*)$/s;
  const REMEMBERED_IDS = 1000;
  const STABLE_MS = 10000;  // a connection this old counts as having worked

  class NikiClient {
    constructor(url, options = {}) {
      this.url = url;
      this.ack = options.ack !== false;
      this.storageKey = options.storageKey || "niki.credential";
      this.onMessage = options.onMessage || (() => {});
      this.onStatus = options.onStatus || (() => {});
      this.maxBackoff = (options.maxBackoff || 30) * 1000;
      this.keepalive = (options.keepalive === undefined ? 60 : options.keepalive) * 1000;
      this.socket = null;
      this.stopped = true;
      this.attempt = 0;
      this.seen = [];
      this._reconnectTimer = null;
      this._keepaliveTimer = null;
      this._pingSentAt = null;
    }

    get credential() {
      try { return root.localStorage.getItem(this.storageKey); } catch (e) { return null; }
    }

    set credential(value) {
      try { root.localStorage.setItem(this.storageKey, value); } catch (e) { /* private mode */ }
    }

    connect() {
      this.stopped = false;
      const locks = root.navigator && root.navigator.locks;
      if (!locks) { this._open(); return; }
      this.onStatus("waiting");
      // Held until close(): another tab of this client waits here meanwhile.
      locks.request(`niki:${this.storageKey}`, () => new Promise((release) => {
        this._releaseLock = release;
        if (this.stopped) { release(); return; }
        this._open();
      }));
    }

    // Ends the connection (DISCONNECT) and stops reconnecting.
    close() {
      this.stopped = true;
      clearTimeout(this._reconnectTimer);
      clearTimeout(this._keepaliveTimer);
      if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send("DISCONNECT");
      if (this._releaseLock) { this._releaseLock(); this._releaseLock = null; }
    }

    _open() {
      const socket = new WebSocket(this.url);
      this.socket = socket;
      let identified = false;
      let openedAt = null;
      socket.onmessage = (event) => {
        this._heard();
        const line = String(event.data);
        if (!identified) {
          if (line === "GET_CLIENT_ID") {
            socket.send((this.credential || "NONE") + (this.ack ? " ACK" : ""));
          } else if (line.startsWith("SET_CLIENT_ID: ")) {
            identified = true;
            openedAt = Date.now();
            this.credential = line.slice("SET_CLIENT_ID: ".length);
            this.onStatus("connected", this.credential.split(".")[0]);
          }
          return;
        }
        this._line(line);
      };
      socket.onclose = () => {
        clearTimeout(this._keepaliveTimer);
        if (this.socket !== socket) return;
        this.socket = null;
        if (this.stopped) { this.onStatus("closed"); return; }
        if (openedAt !== null && Date.now() - openedAt >= STABLE_MS) this.attempt = 0;
        const cap = Math.min(this.maxBackoff, 1000 * 2 ** this.attempt++);
        const delay = Math.random() * cap;
        this.onStatus("reconnecting", Math.round(delay));
        this._reconnectTimer = setTimeout(() => this._open(), delay);
      };
      socket.onerror = () => { /* onclose follows */ };
      this._heard();
    }

    _line(line) {
      let match = MESSAGE_ACK.exec(line);
      if (match) {
        const id = Number(match[1]);
        if (!this.seen.includes(id)) {
          this.onMessage(match[2], id);
          this.seen.push(id);
          if (this.seen.length > REMEMBERED_IDS) this.seen.shift();
        }
        if (this.socket) this.socket.send(`ACK ${id}`);
        return;
      }
      match = MESSAGE.exec(line);
      if (match) { this.onMessage(match[1], null); return; }
      if (line !== "PONG") this.onStatus("notice", line);
    }

    // Keepalive: PING a server silent for `keepalive`; no answer within as long again
    // means the connection is dead (a network that dropped it silently).
    _heard() {
      clearTimeout(this._keepaliveTimer);
      this._pingSentAt = null;
      if (!this.keepalive) return;
      this._keepaliveTimer = setTimeout(() => this._silent(), this.keepalive);
    }

    _silent() {
      const socket = this.socket;
      if (!socket) return;
      if (this._pingSentAt !== null) { socket.close(); return; }
      if (socket.readyState === WebSocket.OPEN) socket.send("PING");
      this._pingSentAt = Date.now();
      this._keepaliveTimer = setTimeout(() => this._silent(), this.keepalive);
    }
  }

  root.NikiClient = NikiClient;
  if (typeof module !== "undefined" && module.exports) module.exports = { NikiClient };
})(typeof window !== "undefined" ? window : globalThis);
