// The klockwork inbox's script: deadline countdowns and live updates.
// Everything works without it: forms post, pages reload.
(function () {
  "use strict";

  // -- countdowns: against the server's clock, not the browser's ------------------
  function span(ms) {
    var s = Math.max(0, Math.round(ms / 1000));
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    if (h > 0) return h + " h " + m + " min";
    if (m > 0) return m + " min " + r + " s";
    return r + " s";
  }

  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-deadline-ms]").forEach(function (el) {
      // data-now-ms is the server's clock when the element was rendered.
      if (!el.dataset.seenAt) el.dataset.seenAt = String(now);
      var serverNow = Number(el.dataset.nowMs) + (now - Number(el.dataset.seenAt));
      var left = Number(el.dataset.deadlineMs) - serverNow;
      var out = el.querySelector("[data-countdown]");
      if (!out) return;
      out.textContent = left > 0 ? "(in " + span(left) + ")" : "(time is up)";
      el.classList.toggle("late", left <= 60000);
    });
  }

  // -- live updates: the stream names sections; fetch them again ------------------
  var stale = {};

  function busy(section) {
    var active = document.activeElement;
    if (active && active !== document.body && section.contains(active)) return true;
    if (section.querySelector("details[open]")) return true;
    var fields = section.querySelectorAll("input[type=text], textarea");
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].value !== fields[i].defaultValue) return true;
    }
    return false;
  }

  function showStale(on) {
    var bar = document.querySelector("[data-stale]");
    if (bar) bar.hidden = !on;
  }

  function refresh(name, force) {
    var section = document.querySelector('[data-section="' + name + '"]');
    if (!section) return;
    if (!force && busy(section)) {
      stale[name] = true;
      showStale(true);
      return;
    }
    fetch("/inbox/partials/" + encodeURIComponent(name), { credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) { window.location.assign("/"); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) return;
        section.innerHTML = html;
        delete stale[name];
        if (Object.keys(stale).length === 0) showStale(false);
        tick();
      })
      .catch(function () { /* the next change will try again */ });
  }

  function live() {
    if (!window.EventSource || !document.querySelector("[data-section]")) return;
    var badge = document.querySelector("[data-live]");
    var source = new EventSource("/inbox/events");
    source.addEventListener("ready", function () {
      if (badge) { badge.hidden = false; badge.classList.remove("off"); badge.textContent = "live"; }
    });
    source.addEventListener("changed", function (e) {
      var data = JSON.parse(e.data);
      (data.sections || []).forEach(function (name) { refresh(name, false); });
    });
    source.addEventListener("signed_out", function () {
      source.close();
      window.location.assign("/");
    });
    source.onerror = function () {
      if (badge) { badge.classList.add("off"); badge.textContent = "reconnecting"; }
      if (source.readyState !== EventSource.CLOSED) return;  // the browser retries by itself
      // Refused (e.g. the server restarted and the session ended): signed out, or try later.
      fetch("/inbox/partials/pending", { credentials: "same-origin" })
        .then(function (r) {
          if (r.status === 401) window.location.assign("/");
          else window.setTimeout(live, 5000);
        })
        .catch(function () { window.setTimeout(live, 5000); });
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    tick();
    window.setInterval(tick, 1000);
    var button = document.querySelector("[data-show-changes]");
    if (button) {
      button.addEventListener("click", function () {
        Object.keys(stale).forEach(function (name) { refresh(name, true); });
      });
    }
    live();
  });
})();
