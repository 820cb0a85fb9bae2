/** `errorInfo()`: decoded from a hand-built error, and from the trailer of a real grpc-js call. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import { EventStoreService, connect, errorInfo, isServiceError, type EventStoreServer, type Gateway } from "../src";
import { BadRequest, ErrorInfo } from "../src/gen/google/rpc/error_details";
import { Status } from "../src/gen/google/rpc/status";

const WRONG_VERSION: ErrorInfo = {
  reason: "WRONG_EXPECTED_VERSION",
  domain: "kpg",
  metadata: { expected: "0", actual: "1" },
};

/** The trailers the gateway sends with an error: a google.rpc.Status whose details hold a BadRequest and an ErrorInfo. */
function statusTrailer(info: ErrorInfo): grpc.Metadata {
  const status = Status.encode({
    code: grpc.status.FAILED_PRECONDITION,
    message: "stream is at version 1, expected 0",
    details: [
      {
        typeUrl: "type.googleapis.com/google.rpc.BadRequest",
        value: Buffer.from(
          BadRequest.encode(BadRequest.fromPartial({ fieldViolations: [{ field: "events" }] })).finish(),
        ),
      },
      { typeUrl: "type.googleapis.com/google.rpc.ErrorInfo", value: Buffer.from(ErrorInfo.encode(info).finish()) },
    ],
  }).finish();
  const metadata = new grpc.Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(status));
  return metadata;
}

function serviceError(metadata: grpc.Metadata): grpc.ServiceError {
  return Object.assign(new Error("9 FAILED_PRECONDITION: stream is at version 1, expected 0"), {
    code: grpc.status.FAILED_PRECONDITION,
    details: "stream is at version 1, expected 0",
    metadata,
  });
}

describe("errorInfo", () => {
  test("decodes the ErrorInfo among the Status details", () => {
    assert.deepEqual(errorInfo(serviceError(statusTrailer(WRONG_VERSION))), WRONG_VERSION);
  });

  test("is undefined without a status trailer or an ErrorInfo", () => {
    assert.equal(errorInfo(serviceError(new grpc.Metadata())), undefined);
    const noInfo = new grpc.Metadata();
    noInfo.set("grpc-status-details-bin", Buffer.from(Status.encode({ code: 5, message: "", details: [] }).finish()));
    assert.equal(errorInfo(serviceError(noInfo)), undefined);
  });

  test("is undefined for what is not a gRPC error", () => {
    for (const value of [new Error("boom"), "boom", undefined, null, { code: 9 }]) {
      assert.equal(isServiceError(value), false);
      assert.equal(errorInfo(value), undefined);
    }
  });
});

describe("errorInfo on a real call", () => {
  let server: grpc.Server;
  let kpg: Gateway;

  before(async () => {
    // The other methods answer UNIMPLEMENTED.
    const eventStore: Pick<EventStoreServer, "appendEvents"> = {
      appendEvents: (_call, callback) =>
        callback({ code: grpc.status.FAILED_PRECONDITION, details: "wrong version", metadata: statusTrailer(WRONG_VERSION) }),
    };
    server = new grpc.Server();
    server.addService(EventStoreService, eventStore);
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, bound) =>
        error ? reject(error) : resolve(bound),
      ),
    );
    kpg = connect(`127.0.0.1:${port}`, { timeoutMs: 5_000 });
  });

  after(() => {
    kpg.close();
    server.forceShutdown();
  });

  test("reads the grpc-status-details-bin trailer of a rejected promise", async () => {
    const append = kpg.events.appendEvents({
      category: "orders",
      streamId: "o-1",
      expectation: { $case: "expectedVersion", value: 0n },
      events: [{ type: "OrderPlaced" }],
    });
    await assert.rejects(append, (error: unknown) => {
      assert.ok(isServiceError(error));
      assert.equal(error.code, grpc.status.FAILED_PRECONDITION);
      assert.deepEqual(errorInfo(error), WRONG_VERSION);
      return true;
    });
  });
});
