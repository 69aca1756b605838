// liftoff's fleet page and a host's audit page (liftoff_airflow.fleet_page inlines this).
// Reads /liftoff/api/fleet (or /liftoff/api/hosts/HOST/audit) with the browser's Airflow
// session cookie and shows it. Every value goes in as text (append(string), textContent):
// nothing from the data is ever parsed as HTML. Refreshes every 5 s while a deploy runs,
// every 30 s otherwise.
(function () {
  "use strict";
  var root = document.querySelector('[data-testid="fleet-root"]');
  var API = root.dataset.api, UI = root.dataset.ui, PAGE = root.dataset.page, HOST = root.dataset.host;
  var FAST = 5000, SLOW = 30000;

  function el(tag, attrs) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined) return;
      if (k === "testid") e.setAttribute("data-testid", v);
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    });
    for (var i = 2; i < arguments.length; i++) add(e, arguments[i]);
    return e;
  }
  function add(parent, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { add(parent, c); }); return; }
    parent.append(child instanceof Node ? child : String(child));
  }
  function box(testid) { return document.querySelector('[data-testid="' + testid + '"]'); }
  function fill(testid) {
    var b = box(testid);
    b.replaceChildren();
    for (var i = 1; i < arguments.length; i++) add(b, arguments[i]);
  }
  function uiLink(path, text) {  // an Airflow UI page: paths come as "/dags/..."
    var ok = typeof path === "string" && path.charAt(0) === "/" && path.charAt(1) !== "/";
    return ok ? el("a", {href: UI + path, target: "_top"}, text) : el("span", {}, text);
  }
  function hostLink(host) {
    return el("a", {href: API + "/fleet/hosts/" + encodeURIComponent(host)}, host);
  }
  function list(items, render, empty) {
    if (!items || !items.length) return el("span", {class: "muted"}, empty || "none");
    return el("ul", {}, items.map(render));
  }
  function duration(s) {
    if (s === null || s === undefined) return "unknown";
    s = Math.round(s);
    if (s < 90) return s + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  // -- the fleet page --------------------------------------------------------------------------------
  function weeklyLock(w) {
    var applies = w.envs.length ? "applies to " + w.envs.join(", ") : "no environment uses it";
    return (w.active ? "on" : "off") + " (" + w.window + "; " + applies + ")";
  }

  function progressItem(p) {
    var h = p.hosts;
    var head = p.env + ": " + p.kind + " " + p.version + " run " + p.run_id + " — " + h.done + " done, "
      + h.failed + " failed, " + h.left + " left; "
      + (p.stopped ? "STOPPED: a batch failed" : "about " + duration(p.eta_s) + " left")
      + (p.eta_at ? " (ETA " + p.eta_at + ")" : "") + (p.batch_s ? "; batch ≈ " + duration(p.batch_s) : "");
    var roles = p.roles.map(function (r) {
      return el("li", {testid: "progress-" + p.env + "-" + r.role},
        r.role + " (" + r.stage + "): batch " + r.batch + " of " + r.batches + ", " + r.done + " done / "
        + r.failed + " failed / " + r.left + " left, " + r.state
        + (r.eta_s !== null && r.eta_s !== undefined ? ", " + duration(r.eta_s) + " left" : ""));
    });
    return el("div", {testid: "progress-" + p.env}, head, el("ul", {}, roles));
  }

  function runRow(r) {
    var stages = r.stages.map(function (s) {
      return [uiLink(s.url, s.name + ": " + s.state), " "];
    });
    return el("tr", {testid: "run-" + r.dag_id + "-" + r.run_id},
      el("td", {}, r.dag_id), el("td", {}, uiLink(r.url, r.run_id)),
      el("td", {class: r.state === "failed" ? "bad" : ""}, r.state || ""),
      el("td", {}, stages), el("td", {}, r.note || ""));
  }

  function approval(a) {
    return el("li", {}, uiLink(a.url, a.subject || a.task_id), " — " + a.dag_id + " " + a.run_id
      + " (" + a.task_id + ", since " + (a.created_at || "?") + ")");
  }

  function roleLine(env, r) {
    var versions = Object.keys(r.versions).map(function (v) { return r.versions[v] + "x " + v; });
    var extra = [];
    if (r.out_of_service) extra.push(r.out_of_service + " out of service");
    if (r.failed) extra.push(r.failed + " failed");
    if (r.in_progress) extra.push(r.in_progress + " in progress");
    return el("li", {testid: "role-" + env + "-" + r.name}, r.name + " (" + r.stage + ", " + r.hosts
      + " hosts): " + versions.join(", ") + (extra.length ? "; " + extra.join(", ") : ""));
  }

  function lockText(lock) {
    if (!lock) return "none";
    return lock.who + (lock.by_hand ? " (by hand)" : "") + ", run " + lock.run_id + ", since " + lock.since
      + (lock.reason ? ", reason: " + lock.reason : "");
  }

  function oosItem(env, o) {
    var why = o.record ? "run " + o.record.run_id + ": " + o.record.reason + " (since " + o.record.since + ")"
      : "NO RECORD" + (o.note && o.note !== "no record" ? " (" + o.note + ")" : "");
    var lbs = Object.keys(o.lbs || {}).map(function (lb) { return lb + ": " + o.lbs[lb]; });
    return el("li", {testid: "oos-" + env + "-" + o.host}, hostLink(o.host), " — " + why
      + (lbs.length ? " [" + lbs.join("; ") + "]" : ""));
  }

  function failedItem(env, f) {
    return el("li", {testid: "failed-" + env + "-" + f.host}, hostLink(f.host),
      " — " + f.reason + " (run " + f.run_id + ")");
  }

  function chefText(chef, count) {
    var parts = [];
    if (chef.env_wide) {
      parts.push("all " + count + " hosts: " + chef.env_wide.kind + " " + chef.env_wide.version + " run "
        + chef.env_wide.run_id + " " + (chef.env_wide.status || "running"));
    }
    chef.hosts.forEach(function (h, i) {
      parts.push(i || parts.length ? "; " : "", hostLink(h.host), " (" + h.why + ")");
    });
    return parts.length ? parts : ["none"];
  }

  function canaryLines(env, canary) {
    if (!canary) return null;
    var lbs = canary.lbs.map(function (lb) {
      var weight = lb.weight === null || lb.weight === undefined ? "?" : String(lb.weight);
      return el("li", {}, lb.name + ": weight ",
        el("span", {testid: "canary-" + env + "-" + lb.name}, weight),
        lb.error ? " (" + lb.error + ")" : (lb.state ? " (" + lb.state + ")" : ""));
    });
    var agree = canary.agree === null || canary.agree === undefined ? "unknown" : (canary.agree ? "yes" : "no");
    return el("div", {}, el("h3", {}, "canary on " + canary.of + "'s LBs"), el("ul", {}, lbs),
      el("div", {}, "LBs agree: ", el("span", {testid: "canary-agree-" + env}, agree)));
  }

  function envSection(name, e, data) {
    var x = e.exceptions;
    var lbs = e.load_balancers.map(function (lb) {
      return el("li", {}, lb.name + ": " + (lb.ok ? lb.servers + " servers" : "NOT READ (" + lb.error + ")"));
    });
    var mine = Object.keys(data.environments).filter(function (n) {
      return data.environments[n].canary_of === name;
    });
    return el("section", {class: "env", testid: "env-" + name},
      el("h2", {}, name, e.canary_of ? " (canary of " + e.canary_of + ")" : ""),
      el("div", {}, "version: ", el("span", {testid: "env-" + name + "-version"}, e.current_version || "unknown"),
        " — " + e.hosts + " hosts, " + x.healthy + " healthy"),
      el("div", {}, "lock: ", el("span", {testid: "lock-" + name}, lockText(e.lock))),
      el("ul", {}, e.roles.map(function (r) { return roleLine(name, r); })),
      el("h3", {}, "out of service (" + x.out_of_service + ")"),
      list(e.out_of_service, function (o) { return oosItem(name, o); }),
      el("h3", {}, "failed (" + x.failed + ")"),
      list(e.failed_hosts, function (f) { return failedItem(name, f); }),
      el("div", {}, "chef stopped: ", el("span", {testid: "chef-" + name}, chefText(e.chef_stopped, e.hosts))),
      el("h3", {}, "load balancers"), el("ul", {}, lbs),
      el("div", {}, "LB disagreements (" + x.lb_disagreements + "): "),
      list(e.lb_disagreements, function (d) {
        var states = Object.keys(d.states).map(function (lb) { return lb + " " + d.states[lb]; });
        return el("li", {}, hostLink(d.server), " " + d.backend + ": " + states.join(", "));
      }),
      canaryLines(name, e.canary),
      mine.map(function (c) { return canaryLines(name, data.environments[c].canary); }));
  }

  function freezeItem(f) {
    if (f.error) {
      return el("li", {class: "bad", testid: "freeze-" + f.env}, f.env + ": the inventory's freezes cannot be read ("
        + f.error + "); its prechecks fail until they are fixed");
    }
    var when = f.active ? "FROZEN until " + f.until : "from " + f.since + " until " + f.until;
    return el("li", {class: f.active ? "bad" : "warn", testid: "freeze-" + f.env},
      f.env + ": " + when + " (" + f.source + ", by " + f.who + "): " + f.reason);
  }

  function analysisItem(a) {
    var cls = a.verdict === "pass" ? "ok" : (a.verdict === "fail" ? "bad" : "warn");
    var where = a.stage + (a.weight === null || a.weight === undefined ? "" : " at weight " + a.weight);
    var score = a.score === null || a.score === undefined ? "-" : String(a.score);
    return el("li", {class: cls}, a.env + " " + where + ": " + a.verdict + " (score " + score + ") -> "
      + a.decision + ", " + a.at + ", run " + a.run_id + ": " + (a.reason || ""));
  }

  function renderFleet(data) {
    fill("updated-at", data.generated_at);
    fill("weekly-lock", weeklyLock(data.weekly_change_lock));
    fill("progress", data.progress.length ? data.progress.map(progressItem) : "no deploy running");
    fill("halts", list(data.halts, function (h) {
      return el("li", {class: "bad"}, h.reason + " (by " + h.who + ", since " + h.since
        + (h.patch_id ? ", patch " + h.patch_id : "") + ")");
    }));
    fill("freezes", list(data.freezes, freezeItem));
    var patches = [];
    Object.keys(data.environments).forEach(function (n) {
      data.environments[n].patches.forEach(function (p) { patches.push([n, p]); });
    });
    fill("patches", list(patches, function (np) {
      var p = np[1];
      return el("li", {}, np[0] + ": " + p.patch_id + " (" + p.status + ", roles " + p.roles.join(", ")
        + ", " + p.hosts + " hosts, run " + p.run_id + (p.reason ? ", " + p.reason : "") + ")");
    }));
    fill("approvals", list(data.approvals, approval));
    var judged = [];
    Object.keys(data.canary_analyses || {}).forEach(function (n) {
      data.canary_analyses[n].forEach(function (a) { judged.push(a); });
    });
    fill("canary-analyses", list(judged, analysisItem));
    var body = box("runs").querySelector("tbody");
    body.replaceChildren();
    data.runs.forEach(function (r) { body.append(runRow(r)); });
    var envs = document.getElementById("envs");
    envs.replaceChildren();
    Object.keys(data.environments).forEach(function (n) {
      envs.append(envSection(n, data.environments[n], data));
    });
    return data.deploying ? FAST : SLOW;
  }

  // -- a host's audit page ---------------------------------------------------------------------------
  function renderHost(data) {
    fill("updated-at", new Date().toISOString().replace(/\.\d+Z$/, "Z"));
    fill("host-info", (data.known ? data.env + ", role " + data.role : "not in the inventory") + "; "
      + data.total + " command(s)" + (data.truncated ? ", the newest " + data.records.length + " shown" : ""));
    var body = box("audit").querySelector("tbody");
    body.replaceChildren();
    data.records.forEach(function (r) {
      body.append(el("tr", {testid: "audit-" + r.id},
        el("td", {}, r.at), el("td", {}, r.run_id), el("td", {}, r.env), el("td", {class: "mono"}, r.command),
        el("td", {class: r.ok ? "ok" : "bad"}, r.exit_code === null ? "none" : String(r.exit_code)),
        el("td", {}, r.duration_s + " s"), el("td", {class: "mono"}, r.output_tail)));
    });
    return SLOW;
  }

  // -- loading -----------------------------------------------------------------------------------------
  function url() {
    return PAGE === "host" ? API + "/api/hosts/" + encodeURIComponent(HOST) + "/audit" : API + "/api/fleet";
  }

  function load() {
    fetch(url(), {credentials: "same-origin", headers: {Accept: "application/json"}, cache: "no-store"})
      .then(function (resp) {
        return resp.json().catch(function () { return {}; }).then(function (body) {
          if (!resp.ok) {
            var detail = typeof body.detail === "string" ? body.detail : resp.statusText;
            throw new Error("HTTP " + resp.status + ": " + detail
              + (resp.status === 401 ? " (log in to Airflow again)" : ""));
          }
          return body;
        });
      })
      .then(function (data) {
        var next = PAGE === "host" ? renderHost(data) : renderFleet(data);
        box("fleet-error").hidden = true;
        root.dataset.state = "ok";
        root.dataset.refreshMs = String(next);
        setTimeout(load, next);
      })
      .catch(function (err) {
        fill("fleet-error", "could not load: " + (err && err.message ? err.message : String(err)));
        box("fleet-error").hidden = false;
        root.dataset.state = "error";
        root.dataset.refreshMs = String(FAST);
        setTimeout(load, FAST);
      });
  }

  load();
})();
