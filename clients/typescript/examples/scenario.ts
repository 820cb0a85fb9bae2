/**
 * The cross-language e2e scenario (clients/SCENARIO.md) for `<lang>` = "typescript": prints `ok <step>` after
 * each step and exits 1, with the reason on stderr, at the first deviation.
 *
 * Env: KPG_TARGET (gRPC host:port), KPG_RUN_ID (unique per run), KPG_DLT_ERROR (the seeded dead letter's error).
 */
import { isDeepStrictEqual } from "node:util";

import {
  ERROR_DOMAIN,
  ReplyStatus,
  SagaStatus,
  connect,
  errorInfo,
  isServiceError,
  replyStatusToJSON,
  sagaStatusToJSON,
  status,
  type AppendEventsRequest,
  type DeepPartial,
  type Gateway,
} from "../src";

const LANG = "typescript";
const CALL_TIMEOUT_MS = 30_000;
const WATCH_TIMEOUT_MS = 60_000;

/** A difference from SCENARIO.md: the program fails with its message. */
class Deviation extends Error {}

function expect(condition: boolean, message: string): asserts condition {
  if (!condition) throw new Deviation(message);
}

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Deviation(`${name} is not set`);
  return value;
}

function json(value: unknown): Buffer {
  return Buffer.from(JSON.stringify(value));
}

function describe(error: unknown): string {
  if (error instanceof Deviation) return error.message;
  if (isServiceError(error)) return `gRPC ${status[error.code]}: ${error.details}`;
  return String(error);
}

/** Runs one step: prints `ok <name>`, or fails the program with `<name>: <what differed>`. */
async function step(name: string, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (error) {
    throw new Deviation(`${name}: ${describe(error)}`);
  }
  console.log(`ok ${name}`);
}

async function run(kpg: Gateway, runId: string, dltError: string): Promise<void> {
  const call = { timeoutMs: CALL_TIMEOUT_MS };
  const streamId = `${LANG}-${runId}`;
  const customer = `c-${LANG}`;
  const append: DeepPartial<AppendEventsRequest> = {
    category: "orders",
    streamId,
    expectation: { $case: "expectedVersion", value: 0n },
    events: [{ type: "OrderPlaced", data: json({ customer, total: 42 }), contentType: "application/json" }],
  };
  let position = "";

  await step("append", async () => {
    const appended = await kpg.events.appendEvents(append, call);
    expect(appended.firstVersion === 1n, `first_version ${appended.firstVersion}, want 1`);
    expect(appended.position !== "", "empty position");
    position = appended.position;
  });

  await step("wrong-expected-version", async () => {
    const failure = await kpg.events.appendEvents(append, call).then(
      (response) => new Deviation(`appended again at version ${response.firstVersion}`),
      (error: unknown) => error,
    );
    if (failure instanceof Deviation) throw failure;
    expect(isServiceError(failure), `not a gRPC error: ${String(failure)}`);
    expect(failure.code === status.FAILED_PRECONDITION, `status ${status[failure.code]}, want FAILED_PRECONDITION`);
    const info = errorInfo(failure);
    expect(info !== undefined, "no google.rpc.ErrorInfo in grpc-status-details-bin");
    expect(info.reason === "WRONG_EXPECTED_VERSION", `reason ${info.reason}, want WRONG_EXPECTED_VERSION`);
    expect(info.domain === ERROR_DOMAIN, `domain ${info.domain}, want ${ERROR_DOMAIN}`);
    expect(info.metadata["actual"] === "1", `metadata ${JSON.stringify(info.metadata)}, want actual=1`);
  });

  await step("read-model", async () => {
    const document = await kpg.readModels.get({ readModel: "order_summary", key: streamId, minPosition: position }, call);
    const data = document.data ?? {};
    expect(
      data["status"] === "PLACED" && data["customer"] === customer && data["total"] === 42,
      `data ${JSON.stringify(data)}`,
    );
    expect(document.version === 1n, `version ${document.version}, want 1`);
  });

  await step("request-reply", async () => {
    const reply = await kpg.requests.request(
      { topic: "inventory.requests", payload: json({ sku: "apple" }), timeoutMs: 10_000 },
      call,
    );
    expect(reply.status === ReplyStatus.REPLY_STATUS_REPLIED, `status ${replyStatusToJSON(reply.status)}`);
    const text = reply.payload.toString("utf8");
    let payload: unknown;
    try {
      payload = JSON.parse(text);
    } catch {
      throw new Deviation(`payload is not JSON: ${text}`);
    }
    expect(isDeepStrictEqual(payload, { sku: "apple", available: 12 }), `payload ${text}`);
  });

  await step("saga", async () => {
    const sagaId = `${LANG}-${runId}`;
    const input = { sku: "apple", quantity: 1, amount: 10, customer };
    await kpg.sagas.startSaga({ sagaType: "place_order", sagaId, input }, call);
    let last = "no state";
    for await (const saga of kpg.sagas.watchSaga({ sagaId }, { timeoutMs: WATCH_TIMEOUT_MS })) {
      last = `${sagaStatusToJSON(saga.status)} ${saga.failureReason}`.trim();
      if (saga.status === SagaStatus.SAGA_STATUS_COMPLETED) return;
      const ended = saga.status === SagaStatus.SAGA_STATUS_FAILED || saga.status === SagaStatus.SAGA_STATUS_COMPENSATED;
      expect(!ended, `ended ${last}`);
    }
    throw new Deviation(`the watch ended at ${last}`);
  });

  await step("dead-letters", async () => {
    let pageToken = "";
    do {
      const page = await kpg.deadLetters.listDeadLetters({ dltTopic: "orders.events.DLT", pageToken }, call);
      if (page.deadLetters.some((d) => d.originalTopic === "orders.events" && d.errorMessage === dltError)) return;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    throw new Deviation(`none from orders.events with error ${JSON.stringify(dltError)}`);
  });
}

async function main(): Promise<number> {
  let kpg: Gateway | undefined;
  try {
    const target = env("KPG_TARGET");
    const runId = env("KPG_RUN_ID");
    const dltError = env("KPG_DLT_ERROR");
    kpg = connect(target);
    await run(kpg, runId, dltError);
    return 0;
  } catch (error) {
    console.error(`FAIL ${describe(error)}`);
    return 1;
  } finally {
    kpg?.close();
  }
}

void main().then((code) => {
  process.exitCode = code;
});
