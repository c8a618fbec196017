/*
 * mailflow analytics dashboard, the browser side of `mailflow web`'s /dashboard.
 *
 * It owns one in-memory snapshot (see the data contract in dashboard.html's
 * server), renders it, and keeps it live over the /dashboard/live WebSocket.
 * Deltas are added locally so numbers move at once; every (re)connect asks
 * for a fresh snapshot and replaces everything, so a lost delta is never a
 * wrong number for long. The model functions at the top are pure (they take
 * and return plain data, no DOM) so they can be tested under node; the DOM
 * shell below them writes with textContent only, because campaign and sender
 * names are user data.
 */
(function () {
  "use strict";

  // ---------------------------------------------------------------- model --

  const COUNTER_KEYS = [
    "sent", "delivered", "deferred", "failed", "bounced", "complained",
    "replied", "auto_replied", "unsubscribed", "opened", "opened_unique",
    "clicked", "clicked_unique", "machine_opens", "machine_clicks",
  ];
  const MINUTE_KEYS = ["sent", "delivered", "bounced"];
  const SERIES_KEYS = [
    "sent", "delivered", "bounced", "complained", "replied",
    "opened_unique", "clicked_unique",
  ];
  const BREAKDOWN_KINDS = ["campaign", "sender", "domain"];
  const BREAKDOWN_KEYS = [
    "sent", "delivered", "bounced", "complained", "replied",
    "opened_unique", "clicked_unique",
  ];
  const BUCKET_SECONDS = { hour: 3600, day: 86400 };
  const RANGES = ["24h", "7d", "30d", "90d"];
  const PRIORITY_ORDER = ["high", "normal", "low"];
  const MINUTES_KEPT = 60;
  const BREAKDOWN_ROWS = 20;

  function num(value) {
    const n = Number(value);
    return Number.isFinite(n) ? n : 0;
  }

  function validBy(by) {
    return Object.prototype.hasOwnProperty.call(BUCKET_SECONDS, by) ? by : null;
  }

  function validRange(range) {
    return RANGES.includes(range) ? range : null;
  }

  function utcDay(epochSeconds) {
    return Math.floor(epochSeconds / 86400);
  }

  function normalizeCounters(raw) {
    const out = {};
    for (const key of COUNTER_KEYS) out[key] = num(raw && raw[key]);
    return out;
  }

  /** Columns {t: [...], key: [...]} with every column as long as t. */
  function normalizeColumns(raw, keys) {
    const t = Array.isArray(raw && raw.t) ? raw.t.map(num) : [];
    const out = { t };
    for (const key of keys) {
      const col = Array.isArray(raw && raw[key]) ? raw[key] : [];
      out[key] = t.map((_, i) => num(col[i]));
    }
    return out;
  }

  function normalizeQueue(raw) {
    return {
      priority: String(raw && raw.priority != null ? raw.priority : "?"),
      depth: num(raw && raw.depth),
      oldest_s: raw && raw.oldest_s != null ? num(raw.oldest_s) : null,
      sla_s: raw && raw.sla_s != null ? num(raw.sla_s) : null,
      breached: Boolean(raw && raw.breached),
    };
  }

  function normalizeQueues(raw) {
    const list = Array.isArray(raw) ? raw.map(normalizeQueue) : [];
    const rank = (q) => {
      const i = PRIORITY_ORDER.indexOf(q.priority);
      return i === -1 ? PRIORITY_ORDER.length : i;
    };
    return list.sort((a, b) => rank(a) - rank(b));
  }

  function normalizeWarnings(raw) {
    const list = Array.isArray(raw) ? raw : [];
    return list
      .map((w) => ({
        level: w && w.level === "critical" ? "critical" : "warning",
        kind: String((w && w.kind) || ""),
        subject: String((w && w.subject) || ""),
        message: String((w && w.message) || ""),
      }))
      .sort((a, b) => (a.level === b.level ? 0 : a.level === "critical" ? -1 : 1));
  }

  function normalizeBreakdownRow(raw) {
    const row = {
      key: String(raw && raw.key != null ? raw.key : ""),
      label: String(raw && raw.label ? raw.label : raw && raw.key != null ? raw.key : ""),
    };
    for (const key of BREAKDOWN_KEYS) row[key] = num(raw && raw[key]);
    return row;
  }

  /** A snapshot as the rest of the code may assume it: every field present. */
  function normalizeSnapshot(raw) {
    if (!raw || typeof raw !== "object") return null;
    const generatedAt = num(raw.generated_at) || Date.now() / 1000;
    const breakdowns = {};
    for (const kind of BREAKDOWN_KINDS) {
      const rows = raw.breakdowns && Array.isArray(raw.breakdowns[kind]) ? raw.breakdowns[kind] : [];
      breakdowns[kind] = rows.map(normalizeBreakdownRow);
    }
    const perMinute = normalizeColumns(raw.per_minute, MINUTE_KEYS);
    trimColumns(perMinute, MINUTE_KEYS, MINUTES_KEPT);
    return {
      tenant: String(raw.tenant || ""),
      generated_at: generatedAt,
      today_day: utcDay(generatedAt),
      by: validBy(raw.by) || "hour",
      range: validRange(raw.range) || "24h",
      counters: normalizeCounters(raw.counters),
      today: normalizeCounters(raw.today),
      per_minute: perMinute,
      queues: normalizeQueues(raw.queues),
      series: normalizeColumns(raw.series, SERIES_KEYS),
      breakdowns,
      warnings: normalizeWarnings(raw.warnings),
    };
  }

  function trimColumns(cols, keys, keep) {
    const extra = cols.t.length - keep;
    if (extra <= 0) return;
    cols.t.splice(0, extra);
    for (const key of keys) cols[key].splice(0, extra);
  }

  /**
   * Make the last per-minute bucket the minute holding nowS, adding empty
   * buckets for the minutes that passed and keeping the last 60.
   */
  function rollMinutes(perMinute, nowS) {
    const minute = Math.floor(nowS / 60) * 60;
    const t = perMinute.t;
    const last = t.length ? t[t.length - 1] : null;
    if (last !== null && minute <= last) return;
    let start = last === null ? minute : last + 60;
    if (minute - start >= MINUTES_KEPT * 60) start = minute - (MINUTES_KEPT - 1) * 60;
    for (let m = start; m <= minute; m += 60) {
      t.push(m);
      for (const key of MINUTE_KEYS) perMinute[key].push(0);
    }
    trimColumns(perMinute, MINUTE_KEYS, MINUTES_KEPT);
  }

  /**
   * Add a delta to a normalized snapshot in place. Returns {resync: true}
   * when the snapshot can no longer be kept right locally (the delta is past
   * the last series bucket), so the caller should ask for a new snapshot.
   */
  function applyDelta(snap, delta, nowMs) {
    const atMs = delta && delta.at_ms != null ? num(delta.at_ms) : nowMs;
    const atS = atMs / 1000;
    const counts = (delta && delta.counters) || {};
    let resync = false;

    const day = utcDay(atS);
    if (day > snap.today_day) {
      // Midnight UTC passed since the snapshot: today starts again from zero.
      snap.today = normalizeCounters(null);
      snap.today_day = day;
    }
    for (const key of Object.keys(counts)) {
      const n = num(counts[key]);
      if (!n) continue;
      snap.counters[key] = num(snap.counters[key]) + n;
      if (day === snap.today_day) snap.today[key] = num(snap.today[key]) + n;
    }

    const pm = snap.per_minute;
    rollMinutes(pm, atS);
    const mi = pm.t.lastIndexOf(Math.floor(atS / 60) * 60);
    if (mi !== -1) {
      for (const key of MINUTE_KEYS) if (key in counts) pm[key][mi] += num(counts[key]);
    }

    const series = snap.series;
    const width = BUCKET_SECONDS[snap.by];
    const n = series.t.length;
    if (n) {
      const lastStart = series.t[n - 1];
      if (atS >= lastStart && atS < lastStart + width) {
        for (const key of SERIES_KEYS) if (key in counts) series[key][n - 1] += num(counts[key]);
      } else if (atS >= lastStart + width) {
        resync = true;
      }
    }
    return { resync };
  }

  /**
   * Sent over the last 60 s, estimated from minute buckets: all of the
   * current minute plus the part of the previous minute still in the window.
   */
  function sentPerMinute(perMinute, nowS) {
    const t = perMinute.t;
    if (!t.length) return 0;
    const minute = Math.floor(nowS / 60) * 60;
    const i = t.lastIndexOf(minute);
    if (i === -1) {
      const prev = t.lastIndexOf(minute - 60);
      if (prev === -1) return 0;
      return Math.round(perMinute.sent[prev] * (1 - (nowS - minute) / 60));
    }
    const current = perMinute.sent[i];
    const previous = i > 0 && t[i - 1] === minute - 60 ? perMinute.sent[i - 1] : 0;
    return Math.round(current + previous * (1 - (nowS - minute) / 60));
  }

  function sumColumn(col) {
    let s = 0;
    for (const v of col) s += v;
    return s;
  }

  /** n / d, or null when d is not positive (rendered as a dash). */
  function rate(n, d) {
    return d > 0 ? n / d : null;
  }

  /** Breakdown rows sorted by sent (then name), at most `limit`, with rates. */
  function breakdownRows(rows, limit) {
    return rows
      .slice()
      .sort((a, b) => b.sent - a.sent || a.label.localeCompare(b.label))
      .slice(0, limit === undefined ? BREAKDOWN_ROWS : limit)
      .map((r) => Object.assign({}, r, {
        bounce_rate: rate(r.bounced, r.sent),
        complaint_rate: rate(r.complained, r.delivered),
        open_rate: rate(r.opened_unique, r.delivered),
        click_rate: rate(r.clicked_unique, r.delivered),
      }));
  }

  /** Reconnect delay in ms for the n-th attempt (0-based): 0.5, 1, 2, 4 ... 10 s, +/-20 %. */
  function backoffDelay(attempt, random) {
    const base = Math.min(10000, 500 * Math.pow(2, Math.max(0, attempt)));
    const jitter = 0.8 + 0.4 * (random === undefined ? Math.random() : random);
    return Math.round(Math.min(10000, base * jitter));
  }

  function formatDuration(seconds) {
    if (seconds === null || !Number.isFinite(seconds)) return "–";
    if (seconds < 10) return `${seconds.toFixed(1)}s`;
    if (seconds < 60) return `${Math.round(seconds)}s`;
    if (seconds < 3600) {
      const m = Math.floor(seconds / 60);
      const s = Math.round(seconds % 60);
      return s ? `${m}m ${s}s` : `${m}m`;
    }
    const h = Math.floor(seconds / 3600);
    const m = Math.round((seconds % 3600) / 60);
    return m ? `${h}h ${m}m` : `${h}h`;
  }

  const model = {
    COUNTER_KEYS, SERIES_KEYS, MINUTE_KEYS, normalizeSnapshot, applyDelta,
    rollMinutes, sentPerMinute, rate, breakdownRows, backoffDelay, formatDuration,
  };
  if (typeof module === "object" && module.exports) module.exports = model;
  if (typeof document === "undefined") return;

  // ------------------------------------------------------------ DOM shell --

  const RANGE_LABELS = { "24h": "last 24 hours", "7d": "last 7 days", "30d": "last 30 days", "90d": "last 90 days" };
  const BY_LABELS = { hour: "per hour", day: "per day" };
  const SERIES_LABELS = {
    sent: "sent", delivered: "delivered", bounced: "bounced", complained: "complaints",
    replied: "replies", opened_unique: "opens (unique)", clicked_unique: "clicks (unique)",
  };
  const SIGNED_OUT = "Signed out - reload to sign in";
  const WATCHDOG_MS = 90000;      // no message at all for this long: the socket is dead
  const PENDING_MS = 5000;        // how long to wait for the snapshot a subscribe asked for
  const RESYNC_MIN_MS = 10000;    // at most one resync request per this long

  const numberFormat = new Intl.NumberFormat();
  const compactFormat = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
  const percentFormat = new Intl.NumberFormat(undefined, { style: "percent", minimumFractionDigits: 1, maximumFractionDigits: 2 });
  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23", timeZone: "UTC" });

  const $ = (sel) => document.querySelector(sel);
  const ui = {
    live: $("#live"),
    liveText: $("#live .live-text"),
    banner: $("#banner"),
    by: $("#by"),
    range: $("#range"),
    asof: $("#asof"),
    counters: Array.from(document.querySelectorAll("[data-counter]")),
    today: Array.from(document.querySelectorAll("[data-today]")),
    rangeLabels: Array.from(document.querySelectorAll("[data-range-label]")),
    byLabels: Array.from(document.querySelectorAll("[data-by-label]")),
    queues: $("#queues"),
    warnings: $("#warnings"),
    warningsCount: $("#warnings-count"),
    seriesChart: $("#series-chart"),
    seriesEmpty: $("#series-empty"),
    seriesSummary: $("#series-summary"),
    minuteChart: $("#minute-chart"),
  };

  const state = {
    snap: null,
    by: "hour",
    range: "24h",
    offsetMs: 0,          // server clock minus ours, from generated_at / at_ms
    ws: null,
    attempt: 0,
    reconnectTimer: null,
    watchdogTimer: null,
    pending: null,        // {by, range, until} of the snapshot we asked for
    lastResyncMs: 0,
    signedOut: false,
    renderQueued: false,
    flashNext: false,
    rendered: false,
  };

  function serverNowMs() {
    return Date.now() + state.offsetMs;
  }

  // -- writing numbers

  function flash(el) {
    el.classList.remove("flash");
    void el.offsetWidth; // restart the animation
    el.classList.add("flash");
  }

  document.addEventListener("animationend", (e) => {
    if (e.target instanceof Element) e.target.classList.remove("flash");
  });

  function setText(el, text, doFlash) {
    if (el.textContent === text) return;
    el.textContent = text;
    if (doFlash) flash(el);
  }

  function formatRate(r) {
    return r === null ? "–" : percentFormat.format(r);
  }

  // -- rendering

  function scheduleRender(doFlash) {
    if (doFlash) state.flashNext = true;
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(() => {
      state.renderQueued = false;
      const f = state.flashNext && state.rendered;
      state.flashNext = false;
      renderNumbers(f);
      charts.update();
      state.rendered = true;
    });
  }

  function renderNumbers(doFlash) {
    const snap = state.snap;
    if (!snap) return;
    const nowS = serverNowMs() / 1000;
    for (const el of ui.counters) {
      const key = el.dataset.counter;
      let value;
      if (key === "sent_per_minute") value = sentPerMinute(snap.per_minute, nowS);
      else if (key === "sent_last_hour") value = sumColumn(snap.per_minute.sent);
      else value = num(snap.counters[key]);
      setText(el, numberFormat.format(value), doFlash);
    }
    for (const el of ui.today) {
      setText(el, numberFormat.format(num(snap.today[el.dataset.today])), doFlash);
    }
    ui.asof.textContent = timeFormat.format(new Date(serverNowMs()));
    ui.asof.dateTime = new Date(serverNowMs()).toISOString();
  }

  function renderLabels() {
    for (const el of ui.rangeLabels) el.textContent = RANGE_LABELS[state.range];
    for (const el of ui.byLabels) el.textContent = BY_LABELS[state.by];
    ui.by.value = state.by;
    ui.range.value = state.range;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderQueues(queues) {
    const box = ui.queues;
    if (!queues.length) {
      box.replaceChildren(el("p", "empty", "No queue data yet."));
      return;
    }
    const existing = new Map();
    for (const node of box.querySelectorAll("[data-queue]")) existing.set(node.dataset.queue, node);
    const nodes = queues.map((q) => {
      let card = existing.get(q.priority);
      if (!card) {
        card = el("article", "queue");
        card.dataset.queue = q.priority;
        const head = el("h3", "queue-name", q.priority);
        const flag = el("span", "queue-flag", "SLA breached");
        flag.dataset.field = "flag";
        head.append(" ", flag);
        const dl = el("dl");
        for (const [field, label] of [["depth", "depth"], ["oldest", "oldest"], ["sla", "SLA"]]) {
          const dd = el("dd", "", "–");
          dd.dataset.field = field;
          dl.append(el("dt", "", label), dd);
        }
        card.append(head, dl);
      }
      card.classList.toggle("breached", q.breached);
      card.dataset.breached = String(q.breached);
      card.querySelector("[data-field=flag]").hidden = !q.breached;
      setText(card.querySelector("[data-field=depth]"), numberFormat.format(q.depth), state.rendered);
      card.querySelector("[data-field=oldest]").textContent = q.depth > 0 || q.oldest_s ? formatDuration(q.oldest_s) : "–";
      card.querySelector("[data-field=sla]").textContent = formatDuration(q.sla_s);
      return card;
    });
    box.replaceChildren(...nodes);
  }

  function renderWarnings(warnings) {
    const items = warnings.map((w) => {
      const li = el("li", `warning level-${w.level}`);
      li.dataset.level = w.level;
      li.dataset.kind = w.kind;
      li.append(el("span", "level", w.level === "critical" ? "Critical" : "Warning"));
      if (w.subject) li.append(el("span", "subject", w.subject));
      li.append(el("span", "message", w.message));
      return li;
    });
    if (!items.length) items.push(el("li", "none", "No warnings"));
    ui.warnings.replaceChildren(...items);
    ui.warningsCount.hidden = warnings.length === 0;
    ui.warningsCount.textContent = String(warnings.length);
  }

  function renderBreakdowns(breakdowns) {
    for (const kind of BREAKDOWN_KINDS) {
      const table = document.querySelector(`table[data-breakdown="${kind}"]`);
      const more = document.querySelector(`[data-breakdown-more="${kind}"]`);
      const all = breakdowns[kind];
      const rows = breakdownRows(all, BREAKDOWN_ROWS);
      const tbody = table.tBodies[0];
      const cols = table.tHead.rows[0].cells.length;
      if (!rows.length) {
        const tr = el("tr", "empty-row");
        const td = el("td", "empty", table.dataset.empty || "Nothing in this range.");
        td.colSpan = cols;
        tr.append(td);
        tbody.replaceChildren(tr);
      } else {
        tbody.replaceChildren(...rows.map((r) => {
          const tr = el("tr");
          tr.dataset.key = r.key;
          const name = el("th", "name", r.label);
          name.scope = "row";
          if (r.key && r.key !== r.label) name.title = r.key;
          tr.append(
            name,
            el("td", "", numberFormat.format(r.sent)),
            el("td", "", numberFormat.format(r.delivered)),
            el("td", "", numberFormat.format(r.bounced)),
            el("td", "rate", formatRate(r.bounce_rate)),
            el("td", "", numberFormat.format(r.complained)),
            el("td", "rate", formatRate(r.complaint_rate)),
            el("td", "", numberFormat.format(r.replied)),
            el("td", "", numberFormat.format(r.opened_unique)),
            el("td", "rate", formatRate(r.open_rate)),
            el("td", "", numberFormat.format(r.clicked_unique)),
            el("td", "rate", formatRate(r.click_rate)),
          );
          return tr;
        }));
      }
      more.hidden = all.length <= rows.length;
      more.textContent = `Showing the top ${rows.length} of ${numberFormat.format(all.length)}.`;
    }
  }

  // -- charts

  const charts = (function () {
    let series = null;
    let minute = null;
    let seriesKey = "";

    function cssVar(name) {
      return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    }

    function utcDate(ts) {
      return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC");
    }

    // Counts are whole numbers: never put a tick at 0.5.
    const COUNT_INCREMENTS = [];
    for (let p = 1; p <= 1e12; p *= 10) COUNT_INCREMENTS.push(p, 2 * p, 5 * p);

    const dayFormat = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", timeZone: "UTC" });

    /** 24-hour UTC tick labels, with the date under the first tick of each day. */
    function timeTicks(u, splits, axisIdx, space, incr) {
      return splits.map((ts, i) => {
        const date = dayFormat.format(new Date(ts * 1000));
        if (incr >= 86400) return date;
        const hm = new Date(ts * 1000).toISOString().slice(11, 16);
        const newDay = i === 0 || Math.floor(splits[i - 1] / 86400) !== Math.floor(ts / 86400);
        return newDay ? `${hm}\n${date}` : hm;
      });
    }

    function axes(compact) {
      const fg = cssVar("--muted");
      const grid = cssVar("--grid");
      return [
        { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 }, values: timeTicks },
        {
          stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { show: false },
          size: compact ? 40 : 50,
          incrs: COUNT_INCREMENTS,
          values: (u, vals) => vals.map((v) => compactFormat.format(v)),
        },
      ];
    }

    function line(key) {
      const color = cssVar(`--c-${key}`) || "#888";
      return {
        label: SERIES_LABELS[key],
        stroke: color,
        width: 2,
        points: { show: false },
        value: (u, v) => (v == null ? "" : numberFormat.format(v)),
      };
    }

    function width(node) {
      return Math.max(200, Math.floor(node.clientWidth));
    }

    function seriesHeight() {
      return window.matchMedia("(max-width: 40rem)").matches ? 220 : 280;
    }

    function build() {
      destroy();
      if (typeof uPlot === "undefined" || !state.snap) return;
      const snap = state.snap;
      const timeSeries = {
        label: "time (UTC)",
        value: (u, ts) => (ts == null ? "" : formatStamp(ts, snap.by === "day")),
      };
      series = new uPlot({
        width: width(ui.seriesChart),
        height: seriesHeight(),
        tzDate: utcDate,
        cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(5, max * 1.1)] } },
        series: [timeSeries].concat(SERIES_KEYS.map(line)),
        axes: axes(false),
      }, seriesData(), ui.seriesChart);
      seriesKey = `${snap.by}/${snap.range}`;
      minute = new uPlot({
        width: width(ui.minuteChart),
        height: 150,
        tzDate: utcDate,
        cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(5, max * 1.1)] } },
        series: [{ label: "minute (UTC)", value: (u, ts) => (ts == null ? "" : formatStamp(ts, false)) }]
          .concat(MINUTE_KEYS.map((key) => Object.assign(line(key), { fill: cssVar(`--f-${key}`) }))),
        axes: axes(true),
      }, minuteData(), ui.minuteChart);
      updateEmpty();
    }

    function formatStamp(ts, dayOnly) {
      const d = new Date(ts * 1000).toISOString();
      return dayOnly ? d.slice(0, 10) : `${d.slice(0, 10)} ${d.slice(11, 16)}`;
    }

    function seriesData() {
      const s = state.snap.series;
      return [s.t].concat(SERIES_KEYS.map((k) => s[k]));
    }

    function minuteData() {
      const m = state.snap.per_minute;
      return [m.t].concat(MINUTE_KEYS.map((k) => m[k]));
    }

    function updateEmpty() {
      const s = state.snap.series;
      ui.seriesEmpty.hidden = s.t.length > 0;
      const total = (k) => numberFormat.format(sumColumn(s[k]));
      ui.seriesSummary.textContent =
        `${RANGE_LABELS[state.snap.range]}, ${BY_LABELS[state.snap.by]}: ` +
        `${total("sent")} sent, ${total("delivered")} delivered, ${total("bounced")} bounced.`;
    }

    function update() {
      if (!state.snap) return;
      if (!series || seriesKey !== `${state.snap.by}/${state.snap.range}`) {
        build();
        return;
      }
      series.setData(seriesData());
      minute.setData(minuteData());
      updateEmpty();
    }

    function destroy() {
      if (series) series.destroy();
      if (minute) minute.destroy();
      series = minute = null;
    }

    function resize() {
      if (series) series.setSize({ width: width(ui.seriesChart), height: seriesHeight() });
      if (minute) minute.setSize({ width: width(ui.minuteChart), height: 150 });
    }

    if (typeof ResizeObserver !== "undefined") {
      let queued = false;
      const ro = new ResizeObserver(() => {
        if (queued) return;
        queued = true;
        requestAnimationFrame(() => { queued = false; resize(); });
      });
      ro.observe(ui.seriesChart);
      ro.observe(ui.minuteChart);
    }
    // Canvas colours come from CSS variables: rebuild when the scheme flips.
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", build);

    return { update, build };
  })();

  // -- applying data

  function applySnapshot(raw, source) {
    const snap = normalizeSnapshot(raw);
    if (!snap) return;
    if (state.pending) {
      const matches = snap.by === state.pending.by && snap.range === state.pending.range;
      if (!matches && Date.now() < state.pending.until) return; // an answer to an older request
      state.pending = null;
    }
    if (state.snap && source === "http" && snap.by === state.snap.by &&
        snap.range === state.snap.range && snap.generated_at < state.snap.generated_at) {
      return; // the socket already brought something newer
    }
    state.offsetMs = snap.generated_at * 1000 - Date.now();
    state.snap = snap;
    state.by = snap.by;
    state.range = snap.range;
    rollMinutes(snap.per_minute, serverNowMs() / 1000);
    renderLabels();
    renderQueues(snap.queues);
    renderWarnings(snap.warnings);
    renderBreakdowns(snap.breakdowns);
    document.body.removeAttribute("aria-busy");
    scheduleRender(true);
  }

  function handleMessage(msg) {
    if (!msg || typeof msg !== "object") return;
    switch (msg.type) {
      case "snapshot":
        applySnapshot(msg, "ws");
        state.attempt = 0; // a working connection: the next failure starts the backoff again
        break;
      case "delta": {
        if (!state.snap) return;
        if (msg.at_ms != null) state.offsetMs = num(msg.at_ms) - Date.now();
        const { resync } = applyDelta(state.snap, msg, serverNowMs());
        if (resync) requestResync();
        scheduleRender(true);
        break;
      }
      case "queues":
        if (!state.snap) return;
        state.snap.queues = normalizeQueues(msg.queues);
        renderQueues(state.snap.queues);
        break;
      case "warnings":
        if (!state.snap) return;
        state.snap.warnings = normalizeWarnings(msg.warnings);
        renderWarnings(state.snap.warnings);
        break;
      default:
        break; // "ping" and anything newer than this page
    }
  }

  function requestResync() {
    if (Date.now() - state.lastResyncMs < RESYNC_MIN_MS) return;
    state.lastResyncMs = Date.now();
    subscribe();
  }

  // -- the live connection

  function setLive(stateName, text) {
    ui.live.dataset.state = stateName;
    ui.liveText.textContent = text;
  }

  function showBanner(text, kind) {
    ui.banner.textContent = text;
    ui.banner.dataset.kind = kind;
    ui.banner.hidden = false;
  }

  function hideBanner(kind) {
    if (ui.banner.dataset.kind === kind) ui.banner.hidden = true;
  }

  function liveUrl() {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/dashboard/live";
  }

  function subscribe() {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      fetchSnapshot();
      return;
    }
    state.pending = { by: state.by, range: state.range, until: Date.now() + PENDING_MS };
    ws.send(JSON.stringify({ type: "subscribe", by: state.by, range: state.range }));
  }

  function armWatchdog() {
    clearTimeout(state.watchdogTimer);
    state.watchdogTimer = setTimeout(() => dropSocket("no message for 90 s"), WATCHDOG_MS);
  }

  function connect() {
    state.reconnectTimer = null;
    if (state.signedOut) return;
    setLive("connecting", "connecting…");
    let ws;
    try {
      ws = new WebSocket(liveUrl());
    } catch (err) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    ws.addEventListener("open", () => {
      if (state.ws !== ws) return;
      setLive("open", "live");
      hideBanner("error");
      armWatchdog();
      subscribe();
    });
    ws.addEventListener("message", (e) => {
      if (state.ws !== ws) return;
      armWatchdog();
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch (err) {
        return;
      }
      handleMessage(msg);
    });
    ws.addEventListener("close", (e) => {
      if (state.ws !== ws) return;
      state.ws = null;
      clearTimeout(state.watchdogTimer);
      if (e.code === 4401) {
        signOut();
        return;
      }
      scheduleReconnect();
    });
  }

  /** Give up on the current socket now, without waiting for its close handshake. */
  function dropSocket() {
    const ws = state.ws;
    state.ws = null;
    clearTimeout(state.watchdogTimer);
    if (ws) {
      try { ws.close(4000, "watchdog"); } catch (err) { /* already closing */ }
    }
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (state.signedOut || state.reconnectTimer) return;
    const delay = backoffDelay(state.attempt, Math.random());
    state.attempt += 1;
    setLive("closed", `offline · retrying in ${Math.max(1, Math.round(delay / 1000))} s`);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function signOut() {
    state.signedOut = true;
    clearTimeout(state.reconnectTimer);
    clearTimeout(state.watchdogTimer);
    state.reconnectTimer = null;
    if (state.ws) {
      const ws = state.ws;
      state.ws = null;
      try { ws.close(); } catch (err) { /* already closed */ }
    }
    setLive("closed", SIGNED_OUT);
    showBanner(SIGNED_OUT, "signed-out");
    document.body.classList.add("signed-out");
  }

  async function fetchSnapshot() {
    if (state.signedOut) return;
    const by = state.by;
    const range = state.range;
    state.pending = { by, range, until: Date.now() + PENDING_MS };
    document.body.setAttribute("aria-busy", "true");
    try {
      const res = await fetch(`/dashboard/data?by=${encodeURIComponent(by)}&range=${encodeURIComponent(range)}`, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (res.status === 401 || res.status === 403) {
        signOut();
        return;
      }
      const type = res.headers.get("content-type") || "";
      if (!res.ok || !type.includes("json")) throw new Error(`HTTP ${res.status}`);
      applySnapshot(await res.json(), "http");
      hideBanner("error");
    } catch (err) {
      document.body.removeAttribute("aria-busy");
      showBanner(`Could not load the dashboard data (${err.message}); it will refresh when the live connection is back.`, "error");
    }
  }

  // -- controls

  function onControlsChange() {
    const by = validBy(ui.by.value);
    const range = validRange(ui.range.value);
    if (!by || !range || (by === state.by && range === state.range)) return;
    state.by = by;
    state.range = range;
    const url = new URL(location.href);
    url.searchParams.set("by", by);
    url.searchParams.set("range", range);
    history.replaceState(null, "", url);
    renderLabels();
    document.body.setAttribute("aria-busy", "true");
    subscribe();
  }

  // -- start

  function readEmbeddedSnapshot() {
    const node = document.getElementById("snapshot");
    if (!node) return null;
    try {
      return JSON.parse(node.textContent);
    } catch (err) {
      return null;
    }
  }

  function start() {
    ui.by.addEventListener("change", onControlsChange);
    ui.range.addEventListener("change", onControlsChange);
    document.getElementById("controls").addEventListener("submit", (e) => e.preventDefault());

    const params = new URLSearchParams(location.search);
    const embedded = readEmbeddedSnapshot();
    if (embedded) applySnapshot(embedded, "embedded");
    const wantBy = validBy(params.get("by")) || state.by;
    const wantRange = validRange(params.get("range")) || state.range;
    state.by = wantBy;
    state.range = wantRange;
    renderLabels();
    if (!state.snap || state.snap.by !== wantBy || state.snap.range !== wantRange) fetchSnapshot();

    // Time moves even when no mail does: roll the minute buckets and the sent/min window.
    setInterval(() => {
      if (!state.snap) return;
      rollMinutes(state.snap.per_minute, serverNowMs() / 1000);
      scheduleRender(false);
    }, 5000);
    window.addEventListener("online", () => {
      if (state.reconnectTimer) {
        clearTimeout(state.reconnectTimer);
        connect();
      }
    });
    connect();
  }

  start();
})();
