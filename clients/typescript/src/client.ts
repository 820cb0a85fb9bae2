/**
 * `connect()`: one channel to a gateway and the five kpg.v1 services on it, with promise-based unary calls,
 * async iterables for server streams and plain-object requests (ts-proto's `fromPartial` fills the rest).
 *
 * The methods come from the generated service definitions, so a new RPC in proto/ appears here once its
 * request factory is added to the tables below (the compiler asks for it).
 */
import * as grpc from "@grpc/grpc-js";

import {
  DeadLettersService,
  DiscardRequest,
  GetDeadLetterRequest,
  ListDeadLetterTopicsRequest,
  ListDeadLettersRequest,
  ReprocessRequest,
} from "./gen/kpg/v1/dead_letters";
import { AppendEventsRequest, EventStoreService, ReadStreamRequest, SubscribeRequest } from "./gen/kpg/v1/event_store";
import {
  GetDocumentRequest,
  GetStatusRequest,
  ListReadModelsRequest,
  QueryRequest,
  ReadModelsService,
  RebuildRequest,
} from "./gen/kpg/v1/read_models";
import { GetReplyRequest, RequestMessage, RequestReplyService } from "./gen/kpg/v1/request_reply";
import { GetSagaRequest, ListSagasRequest, SagasService, StartSagaRequest, WatchSagaRequest } from "./gen/kpg/v1/sagas";

type Builtin = Date | Function | Uint8Array | string | number | boolean | bigint | undefined;

/**
 * A message with every field optional, as ts-proto's `fromPartial` accepts it: 64-bit fields also take a
 * number or a string, a oneof is `{ $case, value }`. (The same type ts-proto emits in each generated file;
 * the request tables below stop compiling if this one ever stops fitting it.)
 */
export type DeepPartial<T> = T extends bigint
  ? string | number | bigint
  : T extends Builtin
    ? T
    : T extends globalThis.Array<infer U>
      ? globalThis.Array<DeepPartial<U>>
      : T extends ReadonlyArray<infer U>
        ? ReadonlyArray<DeepPartial<U>>
        : T extends { $case: string; value: unknown }
          ? { $case: T["$case"]; value?: DeepPartial<T["value"]> }
          : T extends {}
            ? { [K in keyof T]?: DeepPartial<T[K]> }
            : Partial<T>;

/** Per-call settings. */
export interface CallOptions {
  /** Deadline in ms from now (DEADLINE_EXCEEDED past it); default: the connection's `timeoutMs` (unary calls only). */
  timeoutMs?: number;
  /** Request metadata, e.g. `{ authorization: "Bearer ..." }`. */
  metadata?: grpc.Metadata | Record<string, string>;
  /** Cancels the call (gRPC CANCELLED) when aborted. */
  signal?: AbortSignal;
}

/** Settings of a connection. */
export interface ConnectOptions {
  /** Channel credentials; default plaintext (`grpc.credentials.createInsecure()`). */
  credentials?: grpc.ChannelCredentials;
  /** grpc-js channel options, e.g. `{ "grpc.keepalive_time_ms": 30000 }`. */
  channelOptions?: grpc.ClientOptions;
  /** Deadline of every unary call that sets no `timeoutMs`; streams get none by default (Subscribe never ends). */
  timeoutMs?: number;
}

/** One RPC of a ts-proto `outputServices=grpc-js` service definition. */
interface MethodDefinition<Req, Res> {
  readonly path: string;
  readonly responseStream: boolean;
  readonly requestSerialize: (value: Req) => Buffer;
  readonly responseDeserialize: (value: Buffer) => Res;
}

type ServiceDefinition = Record<string, MethodDefinition<never, unknown>>;
type RequestOf<M> = M extends MethodDefinition<infer Req, unknown> ? Req : never;
type ResponseOf<M> = M extends MethodDefinition<never, infer Res> ? Res : never;
type RequestFactories<S extends ServiceDefinition> = {
  readonly [K in keyof S]: { readonly fromPartial: (object: DeepPartial<RequestOf<S[K]>>) => RequestOf<S[K]> };
};

/**
 * The client of one service: each RPC of its definition, named as in ts-proto (`appendEvents`), taking the
 * request as a plain object. A unary RPC returns a promise, rejected with a grpc-js `ServiceError` (see
 * `errorInfo`); a server-streaming RPC returns an async iterable that starts the call when iterated, ends
 * when the server ends it, throws its error, and cancels the call when the loop is left early.
 */
export type ServiceClient<S extends ServiceDefinition> = {
  readonly [K in keyof S]: S[K]["responseStream"] extends true
    ? (request?: DeepPartial<RequestOf<S[K]>>, options?: CallOptions) => AsyncIterable<ResponseOf<S[K]>>
    : (request?: DeepPartial<RequestOf<S[K]>>, options?: CallOptions) => Promise<ResponseOf<S[K]>>;
};

/** `kpg.v1.EventStore`: appendEvents, readStream, subscribe. */
export type EventStore = ServiceClient<typeof EventStoreService>;
/** `kpg.v1.ReadModels`: get, query, getStatus, rebuild, listReadModels. */
export type ReadModels = ServiceClient<typeof ReadModelsService>;
/** `kpg.v1.Sagas`: startSaga, getSaga, listSagas, watchSaga. */
export type Sagas = ServiceClient<typeof SagasService>;
/** `kpg.v1.RequestReply`: request, submitRequest, getReply. */
export type RequestReply = ServiceClient<typeof RequestReplyService>;
/** `kpg.v1.DeadLetters`: listDeadLetterTopics, listDeadLetters, getDeadLetter, reprocess, discard. */
export type DeadLetters = ServiceClient<typeof DeadLettersService>;

/** A connection to a gateway: the five services on one channel. */
export interface Gateway {
  /** Event sourcing: `kpg.v1.EventStore`. */
  readonly events: EventStore;
  /** CQRS read models: `kpg.v1.ReadModels`. */
  readonly readModels: ReadModels;
  /** Orchestrated sagas: `kpg.v1.Sagas`. */
  readonly sagas: Sagas;
  /** Request-reply over Kafka: `kpg.v1.RequestReply`. */
  readonly requests: RequestReply;
  /** Dead-letter topics: `kpg.v1.DeadLetters`. */
  readonly deadLetters: DeadLetters;
  /** The grpc-js client holding the channel, e.g. for `waitForReady`. */
  readonly client: grpc.Client;
  /** Closes the channel; calls still running fail with CANCELLED or UNAVAILABLE. */
  close(): void;
}

const eventStoreRequests: RequestFactories<typeof EventStoreService> = {
  appendEvents: AppendEventsRequest,
  readStream: ReadStreamRequest,
  subscribe: SubscribeRequest,
};
const readModelsRequests: RequestFactories<typeof ReadModelsService> = {
  get: GetDocumentRequest,
  query: QueryRequest,
  getStatus: GetStatusRequest,
  rebuild: RebuildRequest,
  listReadModels: ListReadModelsRequest,
};
const sagasRequests: RequestFactories<typeof SagasService> = {
  startSaga: StartSagaRequest,
  getSaga: GetSagaRequest,
  listSagas: ListSagasRequest,
  watchSaga: WatchSagaRequest,
};
const requestReplyRequests: RequestFactories<typeof RequestReplyService> = {
  request: RequestMessage,
  submitRequest: RequestMessage,
  getReply: GetReplyRequest,
};
const deadLettersRequests: RequestFactories<typeof DeadLettersService> = {
  listDeadLetterTopics: ListDeadLetterTopicsRequest,
  listDeadLetters: ListDeadLettersRequest,
  getDeadLetter: GetDeadLetterRequest,
  reprocess: ReprocessRequest,
  discard: DiscardRequest,
};

/**
 * Connects to a gateway's gRPC address (`host:port`, plaintext unless `options.credentials` say otherwise).
 * The channel connects lazily, on the first call.
 *
 * @example
 * const kpg = connect("127.0.0.1:50051");
 * const appended = await kpg.events.appendEvents({ category: "orders", streamId: "o-1", events: [{ type: "OrderPlaced" }] });
 * kpg.close();
 */
export function connect(target: string, options: ConnectOptions = {}): Gateway {
  const client = new grpc.Client(target, options.credentials ?? grpc.credentials.createInsecure(), options.channelOptions);
  const timeoutMs = options.timeoutMs;
  return {
    events: bindService(client, EventStoreService, eventStoreRequests, timeoutMs),
    readModels: bindService(client, ReadModelsService, readModelsRequests, timeoutMs),
    sagas: bindService(client, SagasService, sagasRequests, timeoutMs),
    requests: bindService(client, RequestReplyService, requestReplyRequests, timeoutMs),
    deadLetters: bindService(client, DeadLettersService, deadLettersRequests, timeoutMs),
    client,
    close: () => client.close(),
  };
}

type AnyMethod = MethodDefinition<unknown, unknown>;
type AnyFactory = { readonly fromPartial: (object: unknown) => unknown };

function bindService<S extends ServiceDefinition>(
  client: grpc.Client,
  service: S,
  factories: RequestFactories<S>,
  unaryTimeoutMs: number | undefined,
): ServiceClient<S> {
  const bound: Record<string, unknown> = {};
  for (const name of Object.keys(service)) {
    const method = service[name] as AnyMethod;
    const factory = (factories as Record<string, AnyFactory>)[name];
    if (factory === undefined) throw new Error(`no request factory for ${method.path}`);
    bound[name] = method.responseStream
      ? (request: unknown = {}, options: CallOptions = {}) =>
          serverStream(client, method, factory.fromPartial(request), options, options.timeoutMs)
      : (request: unknown = {}, options: CallOptions = {}) =>
          unary(client, method, factory.fromPartial(request), options, options.timeoutMs ?? unaryTimeoutMs);
  }
  return bound as ServiceClient<S>;
}

function unary(
  client: grpc.Client,
  method: AnyMethod,
  request: unknown,
  options: CallOptions,
  timeoutMs: number | undefined,
): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const call = client.makeUnaryRequest(
      method.path,
      method.requestSerialize,
      method.responseDeserialize,
      request,
      toMetadata(options.metadata),
      deadline(timeoutMs),
      (error, response) => {
        options.signal?.removeEventListener("abort", cancel);
        if (error) reject(error);
        else resolve(response);
      },
    );
    const cancel = (): void => call.cancel();
    if (options.signal?.aborted) cancel();
    else options.signal?.addEventListener("abort", cancel, { once: true });
  });
}

async function* serverStream(
  client: grpc.Client,
  method: AnyMethod,
  request: unknown,
  options: CallOptions,
  timeoutMs: number | undefined,
): AsyncGenerator<unknown, void, undefined> {
  const call = client.makeServerStreamRequest(
    method.path,
    method.requestSerialize,
    method.responseDeserialize,
    request,
    toMetadata(options.metadata),
    deadline(timeoutMs),
  );
  const cancel = (): void => call.cancel();
  if (options.signal?.aborted) cancel();
  else options.signal?.addEventListener("abort", cancel, { once: true });
  try {
    for await (const message of call) yield message;
  } finally {
    options.signal?.removeEventListener("abort", cancel);
    // A loop left early: cancel the call; its CANCELLED status then has no reader, so it must not throw.
    call.on("error", () => undefined);
    call.cancel();
  }
}

function toMetadata(metadata: CallOptions["metadata"]): grpc.Metadata {
  if (metadata instanceof grpc.Metadata) return metadata;
  const result = new grpc.Metadata();
  for (const [key, value] of Object.entries(metadata ?? {})) result.set(key, value);
  return result;
}

function deadline(timeoutMs: number | undefined): grpc.CallOptions {
  return timeoutMs === undefined ? {} : { deadline: Date.now() + timeoutMs };
}
