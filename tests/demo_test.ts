/**
 * `deno task demo` in CI: the whole local stack (private redis-server, Core emulator, scripted
 * model, a real worker) runs every sample, and what reached Core and the user is checked.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { type DemoReport, runDemo } from "../dev/demo.ts";

const REPO_ROOT = fileURLToPath(new URL("../", import.meta.url));

/** The result of the demo's job whose label starts with `label`. */
function resultOf(report: DemoReport, label: string): Record<string, unknown> {
  const job = report.jobs.find((j) => j.label.startsWith(label));
  assert.ok(job, `no demo job labelled ${label}`);
  assert.equal(job.job.status, "completed", `${label}: ${job.job.error_message}`);
  return job.job.result as Record<string, unknown>;
}

Deno.test("the demo completes every sample job with the expected effects", async () => {
  const lines: string[] = [];
  const report = await runDemo({ out: (line) => lines.push(line), latencyMs: 0 });
  assert.equal(report.ok, true);
  assert.equal(report.jobs.length, 11);
  assert.deepEqual(
    [...new Set(report.jobs.map((j) => j.jobType))].sort(),
    ["email_extract", "followup", "image_tag", "intent_classify", "task_match"],
  );
  const state = report.core;

  // image_tag: the photo (a file with no extension) is described and tagged `suggested`.
  const photo = resultOf(report, "a photo");
  assert.match(String(photo.description), /sun setting over a calm sea/);
  assert.deepEqual(
    state.memories.get("sample-photo")!.tags.map((t) => [t.tag, t.status]).slice(0, 2),
    [["sunset", "suggested"], ["sea", "suggested"]],
  );

  // intent_classify: every intent, relative times in Europe/London, stale for the late message.
  const reminder = resultOf(report, '"Remind me to call mum');
  assert.equal(reminder.intent, "reminder");
  assert.equal(reminder.action, "call mum");
  assert.match(String(reminder.resolved_time), /T09:00:00\+0[01]:00$/);
  assert.equal(reminder.stale, undefined);
  assert.equal(resultOf(report, '"I need to renew').intent, "task");
  const search = resultOf(report, '"What was the wifi');
  assert.equal(search.intent, "search");
  assert.deepEqual(search.results, [{
    memory_id: "sample-cabin-wifi",
    title: "The cabin wifi password is sunshine42",
  }]);
  assert.equal(search.memory_id, null);
  assert.equal(resultOf(report, '"Parked on level 3').intent, "general_note");
  const ambiguous = resultOf(report, '"Friday"');
  assert.equal(ambiguous.intent, "ambiguous");
  const late = resultOf(report, '"Remind me in 2 hours');
  assert.equal(late.intent, "reminder");
  assert.equal(late.stale, true, "written 3 hours ago: the reminder time has passed");
  const answered = resultOf(report, '"Friday" + answer');
  assert.equal(answered.intent, "reminder");
  assert.equal(answered.action, "pick up the cake");
  assert.match(String(answered.resolved_time), /T17:00:00\+0[01]:00$/);
  assert.equal(answered.memory_id, ambiguous.memory_id, "the follow-up reuses the memory");

  // followup, task_match, email_extract.
  assert.match(String(resultOf(report, '"the thing next week"').question), /\?$/);
  assert.equal(resultOf(report, "note ").matched_task_id, "task-milk");
  const email = resultOf(report, "email ");
  const events = email.events as Array<Record<string, unknown>>;
  assert.equal(events.length, 1, "one confident event; the vague one is left out");
  assert.equal(events[0].description, "Dentist appointment at Smile Clinic");
  assert.match(String(events[0].event_time), /-05-14T15:30:00\+01:00$/);
  const stored = [...state.events.values()];
  assert.equal(stored.length, 1);
  assert.equal(stored[0].status, "pending");
  assert.ok(
    stored.every((e) => !e.event_time.includes("-05-07")),
    "the date in the quoted history never became an event",
  );

  // Memories created for the right intents only; tasks never changed.
  const created = [...state.memories.values()].filter((m) => !m.id.startsWith("sample-"));
  assert.deepEqual(created.map((m) => m.content).sort(), [
    "Friday",
    "I need to renew my passport before June",
    "Parked on level 3, spot B12",
    "Remind me in 2 hours to take the bread out of the oven",
    "Remind me to call mum tomorrow at 9am",
  ]);
  assert.ok([...state.tasks.values()].every((t) => t.state === "NOT_DONE"));

  // What the user is told: one notification per job, of the right types.
  assert.deepEqual(
    report.notifications.map((n) => n.message_type).sort(),
    [
      "event_confirmation",
      "llm_followup_result",
      "llm_image_tag_result",
      ...Array(7).fill("llm_intent_result"),
      "llm_task_match_result",
    ].sort(),
  );
  assert.ok(report.notifications.every((n) => n.user_id === 1));

  // The demo's worker ran with an edited followup prompt; a typo in it was refused first.
  assert.match(lines.join("\n"), /followup\.txt: unknown placeholder \{\{mesage\}\}/);
  assert.match(lines.join("\n"), /the worker runs with LLM_PROMPTS_DIR=/);

  // A French-speaking user's follow-up question is asked for, and written, in French.
  assert.match(report.frenchQuestion, /^Voulez-vous un rappel/);

  // The malformed entry went to llm:dead, was listed by `deno task dead list` and dropped.
  assert.match(
    report.deadLetters.listed,
    /llm:intent\s+-\s+malformed job entry: the envelope has no `job_id`/,
  );
  assert.equal(report.deadLetters.dropped, true);

  // Tokens per job type, from the scripted model's usage; every type that asked the model has some.
  for (
    const jobType of ["image_tag", "intent_classify", "followup", "task_match", "email_extract"]
  ) {
    const [prompt, completion] = report.tokens[jobType] ?? [0, 0];
    assert.ok(prompt > 0 && completion > 0, `${jobType}: ${prompt}/${completion} tokens`);
  }

  // With the primary down, the fallback answered and the user heard of no outage.
  assert.deepEqual(report.fallback, {
    status: "completed",
    server: "fallback",
    notices: ["llm_followup_result"],
  });

  // The printed report: progress, the three tables, the summary.
  const text = lines.join("\n");
  assert.match(text, /✓ \[11\/11\]/);
  assert.match(text, /^Jobs$/m);
  assert.match(text, /^What reached Core$/m);
  assert.match(text, /^What user 1 is told \(notify:telegram\)$/m);
  assert.match(text, /11 of 11 jobs completed; 11 notifications/);
  assert.match(
    report.metrics,
    /llm_worker_jobs_total\{job_type="intent_classify",outcome="completed"\} 7/,
  );
});

Deno.test("deno task demo runs on its own and exits 0", async () => {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["task", "--quiet", "demo"],
    cwd: REPO_ROOT,
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(120_000),
  }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  assert.equal(output.code, 0, `${stdout}\n${new TextDecoder().decode(output.stderr)}`);
  assert.match(stdout, /11 of 11 jobs completed/);
  assert.match(stdout, /Demo finished: every job completed\./);
});
