// crm-mailsync web admin page. Plain script, no framework, no build step.
//
// Security model:
// - The admin token lives in this tab's sessionStorage only and is sent as
//   `Authorization: Bearer …` on each /api/v1 call: never in a URL, never in
//   localStorage, never in a cookie. A browser attaches none of it to a
//   request another site forges, so the page is CSRF-safe by construction.
// - Everything the API answers is written into the page as text
//   (textContent / createTextNode), never as HTML: email subjects, addresses
//   and reasons are attacker-controlled.
// - The page's Content-Security-Policy allows this file and app.css only.
"use strict";

(function () {
  const TOKEN_KEY = "crm-mailsync.admin-token";
  const POLL_MS = 2500;

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let refreshing = false;
  let openActivity = null;

  // ---- API -------------------------------------------------------------

  /** An API failure with the message the daemon gave. */
  class ApiFailure extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  /** Calls /api/v1`path`; answers the parsed JSON or throws ApiFailure. */
  async function api(method, path, given) {
    const bearer = given || token();
    let response;
    try {
      response = await fetch("/api/v1" + path, {
        method: method,
        headers: { Authorization: "Bearer " + bearer, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      throw new ApiFailure(0, "the daemon does not answer (" + e.message + ")");
    }
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      let message;
      if (body && typeof body.error === "string") {
        message = body.error;
      } else if (response.status === 404 || response.status === 405) {
        message = "this daemon does not offer " + method + " /api/v1" + path + " (HTTP " + response.status + ")";
      } else {
        message = "HTTP " + response.status + (text ? ": " + text.trim().slice(0, 200) : "");
      }
      throw new ApiFailure(response.status, message);
    }
    return body;
  }

  // ---- small DOM helpers (text only) ------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function cell(...children) {
    return el("td", null, ...children);
  }

  /** Unix seconds as a UTC time; "—" for none. */
  function when(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const d = new Date(seconds * 1000);
    if (isNaN(d.getTime())) return String(seconds);
    return d.toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }

  function timeEl(seconds) {
    if (seconds === null || seconds === undefined) return document.createTextNode("—");
    const d = new Date(seconds * 1000);
    return el("time", { datetime: isNaN(d.getTime()) ? null : d.toISOString(), text: when(seconds) });
  }

  function say(message, isError) {
    const s = $("status");
    s.textContent = message;
    s.classList.toggle("error", !!isError);
  }

  /** Rebuilds a table body, keeping keyboard focus on the same button. */
  function fill(tableId, rows, emptyId) {
    const body = $(tableId).tBodies[0];
    const focused = document.activeElement && body.contains(document.activeElement)
      ? document.activeElement.dataset.key
      : null;
    body.replaceChildren(...rows);
    $(emptyId).hidden = rows.length > 0;
    if (focused) {
      const again = body.querySelector('[data-key="' + CSS.escape(focused) + '"]');
      if (again) again.focus();
    }
  }

  function button(label, key, onClick, description) {
    const b = el("button", { type: "button", text: label, dataset: { key: key }, "aria-label": description || null });
    b.addEventListener("click", onClick);
    return b;
  }

  // ---- mailboxes --------------------------------------------------------

  function testCell(result) {
    const r = result || { status: "not_run" };
    const status = r.status || "not_run";
    return cell(
      el("span", { class: "badge st-" + status, text: status.replace("_", " ") }),
      r.completed_on ? el("br") : null,
      r.completed_on ? timeEl(r.completed_on) : null,
      r.detail ? el("div", { class: "cause", text: r.detail }) : null
    );
  }

  function approvalOf(m) {
    return m.approval || (m.state && m.state.approval) || "—";
  }

  function mailboxRow(m) {
    const st = m.state || {};
    const name = m.name;
    const enabled = st.enabled
      ? cell(el("span", { class: "badge st-success", text: "enabled" }))
      : cell(
          el("span", { class: "badge st-failure", text: "disabled" }),
          st.disabled_reason ? el("div", { class: "cause", text: st.disabled_reason }) : null
        );
    const phase = cell(
      el("span", { class: "phase ph-" + m.phase, text: String(m.phase).replace("_", " ") }),
      m.not_processing_reason ? el("div", { class: "cause", text: m.not_processing_reason }) : null,
      m.not_synced_since ? el("div", { class: "cause", text: "not synced since " + when(m.not_synced_since) }) : null,
      st.last_sync_error && m.phase === "backing_off" ? el("div", { class: "cause", text: st.last_sync_error }) : null
    );
    const act = (verb, label) =>
      button(label, "mb:" + name + ":" + verb, () => mailboxAction(name, verb), label + " mailbox " + name);
    const held = heldBy(st);
    const actions = cell(
      el("div", { class: "actions" },
        act("test", "Test"),
        st.enabled ? act("disable", "Disable") : act("enable", "Enable"),
        act("approve", "Approve"),
        act("reject", "Reject"),
        held
          ? button("Take over", "mb:" + name + ":take-over", () => takeOver(name, held),
            "Take mailbox " + name + " over from deployment " + held.deployment)
          : null)
    );
    const row = el("tr", { dataset: { mailbox: name } },
      el("th", { scope: "row" }, el("span", { class: "name", text: name }), el("div", { class: "email", text: m.email || "" })),
      phase,
      cell(timeEl(st.last_success_at)),
      cell(el("span", { class: "num", text: String(m.backlog ?? 0) })),
      testCell(st.incoming_test),
      testCell(st.outgoing_test),
      testCell(st.act_test),
      cell(approvalOf(m)),
      enabled,
      actions
    );
    return row;
  }

  /** The other deployment whose marker failed the mailbox's incoming test. */
  function heldBy(st) {
    return (st.incoming_test && st.incoming_test.held_by) || null;
  }

  /**
   * A forced Test & Enable, once the operator said yes: the mailbox is
   * claimed for this deployment, and `held` (the other) disables its side.
   */
  function takeOver(name, held) {
    const yes = window.confirm(
      "Mailbox " + name + " is synchronized by deployment " + held.deployment + " on " + held.host +
      " (since " + when(held.claimed_at) + "). Take it over here? That deployment disables its side " +
      "at its next check: a mailbox is synchronized by one deployment only."
    );
    if (yes) mailboxAction(name, "take-over");
  }

  async function mailboxAction(name, verb) {
    const path = verb === "take-over"
      ? "/mailboxes/" + encodeURIComponent(name) + "/test?force=true"
      : "/mailboxes/" + encodeURIComponent(name) + "/" + verb;
    say(name + ": " + verb + "…");
    try {
      const answer = await api("POST", path);
      if ((verb === "test" || verb === "take-over") && answer && answer.job) {
        say(name + ": Test & Enable started (job " + answer.job + ")");
        followJob(answer.job);
      } else {
        const what = answer && answer.status ? " (" + answer.status + ")" : "";
        say(name + ": " + verb + " accepted" + what);
      }
    } catch (e) {
      if (e.status === 401) return signedOut("The daemon no longer accepts the token: " + e.message);
      say(name + ": " + verb + " failed: " + e.message, true);
    }
    refresh();
  }

  /** Follows a Test & Enable job until it is done, showing its progress. */
  async function followJob(id) {
    const line = $("job");
    for (let i = 0; i < 600; i++) {
      let job;
      try {
        job = await api("GET", "/jobs/" + encodeURIComponent(id));
      } catch (e) {
        line.textContent = "Job " + id + ": " + e.message;
        return;
      }
      const progress = (job.completed ?? 0) + " of " + (job.total ?? "?") + " done, " +
        (job.succeeded ?? 0) + " succeeded, " + (job.failed ?? 0) + " failed";
      line.textContent = "Job " + id + " (" + (job.target || job.kind || "") + "): " + job.state + ", " + progress;
      if (job.state === "done") {
        const outcomes = (job.results || []).map((r) => {
          const st = (t) => (t && t.status ? t.status.replace("_", " ") : "not run");
          return r.mailbox + ": incoming " + st(r.incoming) + ", outgoing " + st(r.outgoing) +
            ", ACT " + st(r.act) + (r.enabled ? ", enabled" : ", not enabled") + (r.error ? " (" + r.error + ")" : "");
        });
        line.textContent = "Test & Enable " + (job.target || id) + " done: " +
          (job.summary || progress) + (outcomes.length ? ". " + outcomes.join("; ") : "");
        refresh();
        return;
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  // ---- profiles ---------------------------------------------------------

  /** profile name → id of the Test all job the page follows for it. */
  const profileJobs = new Map();
  /** profile name → its max_concurrent_connections, as last listed. */
  const profileLimits = new Map();
  let lastProfiles = [];
  const JOB_POLL_MS = 1000;

  function profileRow(p) {
    const name = p.name;
    const mailboxes = p.mailboxes || [];
    const running = profileJobs.has(name);
    const server = p.host ? p.host + (p.port ? ":" + p.port : "") + (p.tls ? " (" + p.tls + ")" : "") : "—";
    const test = button(running ? "Testing…" : "Test all", "pr:" + name + ":test", () => testProfile(name),
      "Test & Enable every mailbox of profile " + name);
    test.disabled = running || mailboxes.length === 0;
    return el("tr", { dataset: { profile: name } },
      el("th", { scope: "row", text: name }),
      cell(p.type || "—"),
      cell(server),
      cell(mailboxes.length ? mailboxes.join(", ") : "—"),
      cell(el("span", { class: "num", text: String(p.max_concurrent_connections ?? "—") })),
      cell(el("div", { class: "actions" }, test))
    );
  }

  function showProfiles(list) {
    lastProfiles = list;
    for (const p of list) profileLimits.set(p.name, p.max_concurrent_connections);
    fill("profiles", list.map(profileRow), "profiles-empty");
  }

  /** As the daemon counts it: every direction that ran passed and the
   * mailbox is enabled. */
  function mailboxPassed(r) {
    const ok = (t) => !t || t.status !== "failure";
    return ok(r.incoming) && ok(r.outgoing) && ok(r.act) && !!r.enabled;
  }

  /** Why a mailbox failed: the daemon's own words (what failed and what to
   * do), else the failing direction's detail. */
  function causeOf(r) {
    if (r.error) return r.error;
    for (const [label, t] of [["incoming", r.incoming], ["outgoing", r.outgoing], ["ACT", r.act]]) {
      if (t && t.status === "failure") return label + ": " + (t.detail || "failed");
    }
    return mailboxPassed(r) ? "—" : "not enabled";
  }

  function directionText(t) {
    return t && t.status ? t.status.replace("_", " ") : "not run";
  }

  function resultRow(r) {
    const passed = mailboxPassed(r);
    return el("tr", { dataset: { mailbox: r.mailbox, result: passed ? "passed" : "failed" } },
      el("th", { scope: "row", text: r.mailbox }),
      cell(el("span", { class: "badge " + (passed ? "st-success" : "st-failure"), text: passed ? "passed" : "failed" })),
      cell(directionText(r.incoming)),
      cell(directionText(r.outgoing)),
      cell(directionText(r.act)),
      cell(el("span", { class: "cause", text: causeOf(r) }))
    );
  }

  /** The panel of profile `name`'s Test all, made once and reused. */
  function jobPanel(name) {
    const box = $("profile-jobs");
    const found = Array.from(box.children).find((c) => c.dataset.profileJob === name);
    if (found) return found;
    const titleId = "pj-title-" + box.children.length;
    const panel = el("section", { class: "profile-job", dataset: { profileJob: name }, "aria-labelledby": titleId },
      el("h3", { id: titleId, text: "Test all of profile " + name }),
      el("p", { class: "progress-line", role: "status", "aria-live": "polite" }),
      el("progress", { max: "1", value: "0", "aria-label": "Mailboxes of profile " + name + " tested" }),
      el("p", { class: "summary", hidden: true }),
      el("div", { class: "scroll" },
        el("table", { class: "results" },
          el("caption", { class: "sr-only", text: "Test & Enable results of profile " + name }),
          el("thead", null, el("tr", null,
            el("th", { scope: "col", text: "Mailbox" }),
            el("th", { scope: "col", text: "Result" }),
            el("th", { scope: "col", text: "Incoming" }),
            el("th", { scope: "col", text: "Outgoing" }),
            el("th", { scope: "col", text: "ACT" }),
            el("th", { scope: "col", text: "Cause" }))),
          el("tbody"))));
    box.prepend(panel);
    return panel;
  }

  /** Shows a job's progress, results and (once done) summary in its panel. */
  function showProfileJob(name, job) {
    const panel = jobPanel(name);
    panel.dataset.job = job.id;
    panel.dataset.state = job.state;
    const total = job.total ?? 0;
    const done = job.completed ?? 0;
    const limit = profileLimits.get(name);
    const peak = job.peak_connections !== undefined
      ? "; at most " + job.peak_connections + (limit !== undefined ? " of " + limit : "") + " connection(s) at once"
      : "";
    const counts = done + " of " + total + " mailbox(es) tested: " + (job.succeeded ?? 0) + " passed, " +
      (job.failed ?? 0) + " failed" + peak;
    panel.querySelector(".progress-line").textContent =
      (job.state === "done" ? "Finished. " : "Running (job " + job.id + "): ") + counts;
    const bar = panel.querySelector("progress");
    bar.max = Math.max(total, 1);
    bar.value = Math.min(done, Math.max(total, 1));
    const summary = panel.querySelector(".summary");
    summary.hidden = job.state !== "done";
    summary.textContent = job.state === "done" ? (job.summary || counts) : "";
    panel.querySelector("tbody").replaceChildren(...(job.results || []).map(resultRow));
    panel.classList.toggle("done-ok", job.state === "done" && !job.failed);
    panel.classList.toggle("done-bad", job.state === "done" && !!job.failed);
  }

  async function testProfile(name) {
    if (profileJobs.has(name)) return;
    say("Profile " + name + ": Test all…");
    let job;
    try {
      job = await api("POST", "/profiles/" + encodeURIComponent(name) + "/test");
    } catch (e) {
      if (e.status === 401) return signedOut("The daemon no longer accepts the token: " + e.message);
      say("Profile " + name + ": Test all failed: " + e.message, true);
      return;
    }
    const id = job.job || job.id;
    say("Profile " + name + ": Test all started (job " + id + ")");
    profileJobs.set(name, id);
    showProfiles(lastProfiles);
    try {
      // Up to an hour: a big profile behind a low connection limit.
      for (let i = 0; i < 3600 && token(); i++) {
        showProfileJob(name, job);
        if (job.state === "done") {
          say("Profile " + name + ": Test all done");
          break;
        }
        await new Promise((r) => setTimeout(r, JOB_POLL_MS));
        try {
          job = await api("GET", "/jobs/" + encodeURIComponent(id));
        } catch (e) {
          if (e.status === 401) return signedOut("The daemon no longer accepts the token: " + e.message);
          jobPanel(name).querySelector(".progress-line").textContent = "Job " + id + ": " + e.message;
          break;
        }
      }
    } finally {
      profileJobs.delete(name);
      showProfiles(lastProfiles);
    }
    refresh();
  }

  // ---- alerts -----------------------------------------------------------

  function alertRow(a) {
    const where = a.mailbox || (a.profile ? "profile " + a.profile : "—");
    const state = a.resolved_at
      ? cell("resolved ", timeEl(a.resolved_at))
      : cell(a.acknowledged_at ? "open, acknowledged " : "open", a.acknowledged_at ? timeEl(a.acknowledged_at) : null);
    const actions = a.resolved_at || a.acknowledged_at
      ? cell()
      : cell(button("Acknowledge", "al:" + a.id, () => acknowledge(a.id), "Acknowledge alert " + a.id));
    return el("tr", { dataset: { alert: a.id, level: a.level } },
      cell(el("span", { class: "badge lv-" + a.level, text: a.level })),
      cell(where),
      cell(el("span", { class: "alert-text", text: a.text }), a.kind ? el("div", { class: "cause", text: a.kind }) : null),
      cell(el("span", { class: "num", text: String(a.count) })),
      cell(timeEl(a.first_seen)),
      cell(timeEl(a.last_seen)),
      state,
      actions
    );
  }

  async function acknowledge(id) {
    try {
      await api("POST", "/alerts/" + encodeURIComponent(id) + "/acknowledge");
      say("Alert " + id + " acknowledged");
    } catch (e) {
      if (e.status === 401) return signedOut("The daemon no longer accepts the token: " + e.message);
      say("Alert " + id + ": acknowledge failed: " + e.message, true);
    }
    refresh();
  }

  function alertQuery() {
    const state = $("alert-state").value;
    const level = $("alert-level").value;
    const q = new URLSearchParams();
    if (state !== "all") q.set("state", state);
    if (level) q.set("level", level);
    q.set("limit", "200");
    return q.toString();
  }

  /** Filters client-side too, so the view is right against a daemon whose
   * /alerts does not filter yet. */
  function alertShown(a) {
    const state = $("alert-state").value;
    const level = $("alert-level").value;
    if (state === "open" && a.resolved_at) return false;
    if (state === "resolved" && !a.resolved_at) return false;
    return !level || a.level === level;
  }

  // ---- activities -------------------------------------------------------

  function regardingText(r) {
    if (!r) return "—";
    if (typeof r === "string") return r;
    if (r.kind && r.id) return r.kind + ":" + r.id;
    return JSON.stringify(r);
  }

  function score(s) {
    return typeof s === "number" ? s.toFixed(2) : "—";
  }

  function activityRow(a) {
    const subject = button(a.subject || "(no subject)", "ac:" + a.id, () => showReasons(a.id),
      "Why is “" + (a.subject || "(no subject)") + "” on its record?");
    subject.classList.add("link");
    return el("tr", { dataset: { activity: a.id } },
      cell(a.received_at !== undefined ? timeEl(a.received_at) : a.received || "—"),
      cell(a.mailbox),
      el("th", { scope: "row" }, subject),
      cell((a.from || []).join(", ")),
      cell(regardingText(a.regarding)),
      cell(a.method || "—"),
      cell(el("span", { class: "num", text: score(a.score) }))
    );
  }

  async function showReasons(id) {
    let a;
    try {
      a = await api("GET", "/activities/" + encodeURIComponent(id));
    } catch (e) {
      if (e.status === 401) return signedOut("The daemon no longer accepts the token: " + e.message);
      say("Activity " + id + ": " + e.message, true);
      return;
    }
    openActivity = id;
    $("r-subject").textContent = a.subject || "(no subject)";
    $("r-from").textContent = (a.from || []).join(", ") || "—";
    $("r-regarding").textContent = regardingText(a.regarding);
    $("r-method").textContent = a.method || "—";
    $("r-score").textContent = score(a.score);
    $("r-automatic").textContent = a.automatic ? a.automatic + (a.no_reply ? " (never answered)" : "") : "no";
    const reasons = (a.reasons || []).map((r) => el("li", { text: r }));
    $("r-reasons").replaceChildren(...(reasons.length ? reasons : [el("li", { text: "No reasons were recorded." })]));
    const parties = (a.parties || []).map((p) =>
      el("li", { text: p.role + ": " + p.address + " → " + (p.record ? regardingText(p.record) : "no record") + (p.note ? " (" + p.note + ")" : "") }));
    $("r-parties").replaceChildren(...(parties.length ? parties : [el("li", { text: "—" })]));
    const panel = $("reasons");
    panel.hidden = false;
    panel.focus();
  }

  // ---- quarantine -------------------------------------------------------

  function quarantineRow(q) {
    const s = q.source || {};
    return el("tr", { dataset: { quarantine: q.id } },
      cell(timeEl(q.at)),
      cell(s.mailbox || "—"),
      cell(el("span", { class: "mono", text: (s.folder || "") + " " + (s.uid || "") })),
      cell(q.reason),
      cell(el("span", { class: "num", text: String(q.size ?? "") })),
      cell(button("Retry", "qu:" + q.id, () => retry(q.id), "Retry quarantined message " + q.id))
    );
  }

  async function retry(id) {
    try {
      await api("POST", "/quarantine/" + encodeURIComponent(id) + "/retry");
      say("Quarantined message " + id + " queued for retry");
    } catch (e) {
      if (e.status === 401) return signedOut("The daemon no longer accepts the token: " + e.message);
      say("Quarantined message " + id + ": retry failed: " + e.message, true);
    }
    refresh();
  }

  // ---- refresh loop -----------------------------------------------------

  async function refresh() {
    if (refreshing || !token()) return;
    refreshing = true;
    try {
      const [mb, pr, al, ac, qu] = await Promise.all([
        api("GET", "/mailboxes"),
        api("GET", "/profiles"),
        api("GET", "/alerts?" + alertQuery()),
        api("GET", "/activities?limit=50"),
        api("GET", "/quarantine?limit=100"),
      ]);
      fill("mailboxes", (mb.mailboxes || []).map(mailboxRow), "mailboxes-empty");
      showProfiles(pr.profiles || []);
      fill("alerts", (al.alerts || []).filter(alertShown).map(alertRow), "alerts-empty");
      fill("activities", (ac.activities || []).map(activityRow), "activities-empty");
      $("activities-total").textContent = ac.total !== undefined
        ? "Showing " + (ac.count ?? 0) + " of " + ac.total + " activities."
        : "";
      fill("quarantine", (qu.quarantine || []).map(quarantineRow), "quarantine-empty");
      $("updated").textContent = new Date().toISOString().slice(11, 19) + " UTC";
      $("updated").dataset.at = String(Date.now());
    } catch (e) {
      if (e.status === 401) {
        signedOut("The daemon no longer accepts the token: " + e.message);
      } else {
        say("Could not refresh: " + e.message, true);
      }
    } finally {
      refreshing = false;
    }
  }

  function schedule() {
    clearInterval(timer);
    timer = null;
    // Poll only while the tab is visible and live updates are on.
    if (token() && $("live").checked && !document.hidden) {
      timer = setInterval(refresh, POLL_MS);
    }
  }

  // ---- sign in / out ----------------------------------------------------

  /** Which deployment this is: the id another deployment's refusal of a
   * mailbox names (one mailbox, one deployment). */
  async function showDeployment() {
    try {
      const d = await api("GET", "/deployment");
      $("deployment").textContent = "Deployment " + d.id + " on " + d.host + " (v" + d.version + ") · ";
    } catch (e) {
      $("deployment").textContent = "";
    }
  }

  function showApp() {
    $("signin-view").hidden = true;
    $("app-view").hidden = false;
    $("who").hidden = false;
    showDeployment();
    refresh();
    schedule();
  }

  function signedOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    clearInterval(timer);
    timer = null;
    $("app-view").hidden = true;
    $("who").hidden = true;
    $("signin-view").hidden = false;
    $("signin-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const given = $("token").value.trim();
    $("signin-error").textContent = "";
    if (!given) {
      $("signin-error").textContent = "Enter the admin token.";
      return;
    }
    $("signin-button").disabled = true;
    try {
      // The mailbox list proves the token before the page keeps it.
      await api("GET", "/mailboxes", given);
      sessionStorage.setItem(TOKEN_KEY, given);
      $("token").value = "";
      showApp();
      say("Signed in.");
    } catch (e) {
      $("signin-error").textContent = e.status === 401
        ? "The daemon refused this token: " + e.message + "."
        : "Could not sign in: " + e.message;
    } finally {
      $("signin-button").disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("signin").addEventListener("submit", signIn);
    $("signout").addEventListener("click", () => signedOut("Signed out."));
    $("live").addEventListener("change", schedule);
    $("alert-state").addEventListener("change", refresh);
    $("alert-level").addEventListener("change", refresh);
    $("reasons-close").addEventListener("click", () => {
      $("reasons").hidden = true;
      const back = openActivity !== null && document.querySelector('[data-key="ac:' + openActivity + '"]');
      openActivity = null;
      if (back) back.focus();
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && !$("reasons").hidden) $("reasons-close").click();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh();
      schedule();
    });
    if (token()) showApp();
    else $("token").focus();
  });
})();
