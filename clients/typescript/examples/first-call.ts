/**
 * A first call: append an event to a new stream, then read the stream back.
 *
 *   npm run build && KPG_TARGET=127.0.0.1:50051 node dist/examples/first-call.js
 */
import { randomUUID } from "node:crypto";

import { connect, errorInfo } from "../src";

async function main(): Promise<void> {
  const kpg = connect(process.env["KPG_TARGET"] ?? "127.0.0.1:50051", { timeoutMs: 10_000 });
  try {
    const streamId = `first-call-${randomUUID()}`;
    const appended = await kpg.events.appendEvents({
      category: "orders",
      streamId,
      expectation: { $case: "expectedVersion", value: 0n }, // the stream must not exist yet
      events: [{ type: "OrderPlaced", data: Buffer.from(JSON.stringify({ customer: "c-1", total: 42 })) }],
    });
    console.log(`appended ${streamId} version ${appended.firstVersion} at ${appended.topic}/${appended.partition}`);

    const read = await kpg.events.readStream({ category: "orders", streamId, minPosition: appended.position });
    for (const event of read.events) {
      console.log(`${event.version} ${event.type} ${event.recordedAt?.toISOString()} ${event.data.toString("utf8")}`);
    }
  } catch (error) {
    // errorInfo gives the contract's reason, e.g. NOT_FOUND for an undeclared category.
    console.error(`failed: ${errorInfo(error)?.reason ?? "?"}: ${String(error)}`);
    process.exitCode = 1;
  } finally {
    kpg.close();
  }
}

void main();
