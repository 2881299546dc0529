// Classify one image through a Fovea gateway, from TypeScript on Node.
//
//   node dist/classify.js --address 127.0.0.1:8500 --model colors [--top-k 3] [--ca ca.pem] photo.jpg
//
// The API key comes from FOVEA_API_KEY (never from the command line, so it stays out of `ps`).
// The types under src/generated/ come from protos/ via proto-loader-gen-types (npm run gen);
// the service definition is loaded from the same .proto files at run time.
import * as fs from "node:fs";
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import type { ProtoGrpcType } from "./generated/image";
import type { ClassifyResponse__Output } from "./generated/fovea/v1/ClassifyResponse";

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "..", "protos");

interface Args {
  address: string;
  model: string;
  alias: string;
  topK: number;
  ca: string;
  timeoutMs: number;
  image: string;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { address: "127.0.0.1:8500", model: "", alias: "", topK: 5, ca: "", timeoutMs: 30000, image: "" };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${flag} needs a value`);
      return v;
    };
    if (flag === "--address") args.address = value();
    else if (flag === "--model") args.model = value();
    else if (flag === "--alias") args.alias = value();
    else if (flag === "--top-k") args.topK = Number(value());
    else if (flag === "--ca") args.ca = value();
    else if (flag === "--timeout-ms") args.timeoutMs = Number(value());
    else if (flag.startsWith("--")) throw new Error(`unknown flag ${flag}`);
    else args.image = flag;
  }
  if (!args.model || !args.image) throw new Error("usage: classify.js --address HOST:PORT --model NAME [--top-k K] [--ca CA.pem] IMAGE");
  return args;
}

function loadService(): ProtoGrpcType {
  const definition = protoLoader.loadSync("fovea/v1/image.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType;
}

async function main(): Promise<number> {
  const args = parseArgs(process.argv.slice(2));
  const apiKey = process.env.FOVEA_API_KEY;
  if (!apiKey) throw new Error("set FOVEA_API_KEY to an API key");
  const proto = loadService();
  const creds = args.ca ? grpc.credentials.createSsl(fs.readFileSync(args.ca)) : grpc.credentials.createInsecure();
  const client = new proto.fovea.v1.ImageService(args.address, creds, {
    "grpc.max_send_message_length": 64 * 1024 * 1024,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
  });
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${apiKey}`);
  const request = {
    model: args.model,
    alias: args.alias,
    top_k: args.topK,
    images: [{ data: fs.readFileSync(args.image), id: path.basename(args.image) }],
  };
  const response = await new Promise<ClassifyResponse__Output>((resolve, reject) => {
    client.Classify(request, metadata, { deadline: Date.now() + args.timeoutMs }, (err, resp) => {
      if (err) reject(err);
      else if (!resp) reject(new Error("empty response"));
      else resolve(resp);
    });
  });
  client.close();
  console.log(`model: ${response.model} v${response.version}`);
  for (const result of response.results) {
    const labels = result.labels.map((l) => `${l.label} (${l.score.toFixed(2)})`).join(" | ");
    console.log(`${result.image_id}: ${labels}`);
  }
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err: grpc.ServiceError | Error) => {
    const code = "code" in err ? ` (${grpc.status[err.code]})` : "";
    console.error(`error${code}: ${err.message}`);
    process.exit(1);
  },
);
